"""Deployment: real-time SimRobot on the real Push-T sim, timestamped action queue, sync/async control loop,
deadline misses with a deliberately slow policy, clean shutdown, observation-spec checks, the deploy verb.
Behaviour only: no assertion depends on how fast this machine is."""

import time

import numpy as np
import pytest
import torch
from tiny import tiny_train

from shortcut_policy import cli
from shortcut_policy.deploy import ActionQueue, ObservationError, SimRobot, check_spec, validate_observation
from shortcut_policy.deploy.loop import ControlLoop, make_policy_fn, sustainable
from shortcut_policy.envs.pusht import make_env
from shortcut_policy.policy import load_policy

TINY = [
    *tiny_train(batch_size=4, warmup_steps=1),
    "train.num_steps=1",
]
TASK = {"env": "pusht", "obs_type": "keypoints", "max_steps": 300}


def tiny_checkpoint(tmp_path_factory):
    """One tiny checkpoint per pytest session (shared by test_deploy and test_export through the base temp dir)."""
    from shortcut_policy.datasets.pusht import write_synthetic_pusht_zarr

    base = tmp_path_factory.getbasetemp() / "deploy_tiny"
    ckpt = base / "run" / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        base.mkdir(exist_ok=True)
        write_synthetic_pusht_zarr(base / "pusht.zarr", episode_lengths=(30, 25, 41), with_images=False)
        cli.run_verb(
            "train",
            ["task=pusht_lowdim", f"task.dataset.zarr_path={base / 'pusht.zarr'}", *TINY, f"run_dir={base / 'run'}"],
        )
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def policy(ckpt):
    return load_policy(ckpt)


def sim(hz=50.0, clock=time.perf_counter):
    return SimRobot(make_env(TASK, wrap=False), hz, n_obs_steps=2, clock=clock)


# --- action queue ----------------------------------------------------------------------------------------------
def test_action_queue_drops_stale_and_replaces_or_ensembles():
    q = ActionQueue(t0=0.0, dt=0.1, tolerance=0.02)
    chunk = np.arange(8, dtype=np.float64)[:, None] * np.ones((1, 2))
    # predicted from the observation at t=0.2, arriving at t=0.41: actions due at 0.2, 0.3 are past -> dropped
    assert q.add_chunk(chunk, obs_time=0.2, now=0.41) == 2 and q.n_dropped_stale == 2
    assert q.pop(0.3) is None
    np.testing.assert_allclose(q.pop(0.4), [2, 2])  # action k is due at obs_time + k dt
    assert q.remaining(0.4) == 5
    q.add_chunk(chunk + 100, obs_time=0.5, now=0.51)  # newer chunk wins where they overlap
    np.testing.assert_allclose(q.pop(0.5), [100, 100])
    assert q.pop(0.7) is not None and q.n_dropped_unused == 1  # the action for 0.6 was never executed
    e = ActionQueue(t0=0.0, dt=0.1, tolerance=0.0, ensemble_k=0.0)  # k=0: plain mean of the predictions
    e.add_chunk(chunk, 0.0, now=0.0)
    e.add_chunk(chunk + 10, 0.1, now=0.1)
    np.testing.assert_allclose(e.pop(0.2), [(2 + 11) / 2] * 2)
    o = ActionQueue(t0=0.0, dt=0.1, tolerance=0.0)  # over budget: every action past -> the last one at the next tick
    assert o.add_chunk(chunk, obs_time=0.0, now=1.234) == 8 and o.n_over_budget == 1
    assert o.pop(1.2) is None
    np.testing.assert_allclose(o.pop(1.3), [7, 7])


# --- sim robot on a manual clock: real-time semantics without depending on this machine's speed -----------------
def test_sim_robot_steps_on_the_clock_and_latches_timed_commands():
    now = [0.0]
    r = sim(hz=10.0, clock=lambda: now[0])
    t0 = r.start(seed=100000)
    obs = r.get_observation()
    assert obs["obs"].shape == (2, 20) and list(obs["timestamp"]) == [t0, t0]
    now[0] = 0.25  # two ticks passed, no command yet: the robot stands still
    obs = r.get_observation()
    assert r.ticks == 2 and r.n_env_steps == 0 and obs["timestamp"][-1] == pytest.approx(0.2)
    target = obs["obs"][-1, -2:] + np.array([40.0, 0.0])
    r.send_action(target, t_exec=0.4)  # due at tick 4: not applied at tick 2 or 3
    now[0] = 0.41
    r.get_observation()
    assert r.n_env_steps == 0
    now[0] = 0.51
    obs = r.get_observation()
    assert r.n_env_steps == 1 and obs["obs"][-1, -2] > obs["obs"][-2, -2]  # moved towards the target during tick 4
    assert obs["timestamp"][-1] == pytest.approx(0.5)
    now[0] = 0.75
    r.send_action(target, t_exec=0.5)  # 0.25 s late: counted
    assert r.n_late_commands == 1
    r.close()
    r.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        r.get_observation()


def test_sim_robot_auto_reset_keeps_running_and_records_episodes():
    now = [0.0]
    r = SimRobot(
        make_env({**TASK, "max_steps": 5}, wrap=False), 10.0, n_obs_steps=2, clock=lambda: now[0], auto_reset=True
    )
    r.start(seed=100000)
    first = r.get_observation()["obs"][-1].copy()
    r.send_action(first[-2:] + 30.0, t_exec=0.0)
    now[0] = 0.71  # 7 ticks: the 5-step episode ends, a new one starts
    obs = r.get_observation()
    assert not r.done and r.n_env_steps == 7
    assert [(e["seed"], e["env_steps"]) for e in r.episodes] == [(100000, 5)]
    assert r.info()["episodes"] == r.episodes and r.info()["n_env_steps"] == 7
    # the new episode started from seed 100001's initial state: the T block is elsewhere
    assert not np.allclose(obs["obs"][-1, :18], first[:18])
    r.close()


# --- control loop on the real Push-T sim ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_loop_runs_chunks_in_both_modes(policy, mode):
    robot = sim(hz=50.0)
    loop = ControlLoop(
        robot,
        make_policy_fn(policy, 1, seed=0),
        policy.task_cfg["obs_shapes"],
        policy.n_obs_steps,
        mode=mode,
        expected_latency_s=0.005,
    )
    st = loop.run(40, seed=100000)
    assert robot.closed and st.stopped_by == "n_steps"
    assert st.cycles + st.skipped_ticks == 40 and st.chunks >= 2 and len(st.inference_s) == st.chunks
    assert robot.n_env_steps > 0 and robot.n_commands > 0
    if mode == "async":  # a chunk lands after its observation's tick: its first action is always past -> dropped
        assert st.stale_dropped >= st.chunks - 1 >= 1
    else:  # sync plans in cycle 0: no start-up ticks; a fast policy misses no deadline
        assert st.startup_ticks == 0 and st.skipped_ticks == 0 or st.deadline_misses > 0
    s = st.summary()
    assert np.isfinite([s["cycle_p50_ms"], s["jitter_p99_ms"], s["inference_p99_ms"]]).all()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_slow_policy_causes_counted_deadline_misses_and_held_actions(policy, mode):
    robot = sim(hz=50.0)
    fast = make_policy_fn(policy, 1, seed=0)

    def slow(obs):  # 4 periods per call: longer than one period (sync) and than the action margin (async)
        time.sleep(4 * robot.dt)
        return fast(obs)

    loop = ControlLoop(
        robot, slow, policy.task_cfg["obs_shapes"], policy.n_obs_steps, mode=mode, expected_latency_s=0.0
    )
    st = loop.run(40, seed=100000)
    assert robot.closed and st.deadline_misses > 0
    if mode == "sync":
        assert st.skipped_ticks > 0  # the loop skipped the ticks it overran instead of bursting
    assert (
        robot.n_commands >= st.cycles - st.startup_ticks - 1
    )  # every cycle after the first plan sent an action (held if late)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_errors_and_ctrl_c_stop_the_robot_cleanly(policy, mode):
    fast = make_policy_fn(policy, 1, seed=0)
    calls = [0]

    def failing(obs):
        calls[0] += 1
        if calls[0] == 2:
            raise FloatingPointError("boom")
        return fast(obs)

    robot = sim(hz=50.0)
    loop = ControlLoop(robot, failing, policy.task_cfg["obs_shapes"], policy.n_obs_steps, mode=mode)
    with pytest.raises((FloatingPointError, RuntimeError), match="boom"):
        loop.run(200, seed=100000)
    assert robot.closed

    def interrupted(obs):
        raise KeyboardInterrupt

    robot = sim(hz=50.0)
    loop = ControlLoop(robot, interrupted, policy.task_cfg["obs_shapes"], policy.n_obs_steps, mode="sync")
    st = loop.run(50, seed=100000)
    assert st.stopped_by == "interrupt" and robot.closed


def test_bad_observation_stops_the_loop_with_the_key_named(policy):
    class BrokenRobot(SimRobot):
        def get_observation(self):
            obs = super().get_observation()
            if self.ticks >= 3:
                obs["obs"] = obs["obs"][:, :19]
            return obs

    robot = BrokenRobot(make_env(TASK, wrap=False), 50.0, n_obs_steps=2)
    loop = ControlLoop(robot, make_policy_fn(policy, 1), policy.task_cfg["obs_shapes"], policy.n_obs_steps, mode="sync")
    with pytest.raises(ObservationError, match=r"observation 'obs' has shape \(2, 19\)"):
        loop.run(100, seed=100000)
    assert robot.closed


# --- spec checks and the deploy verb -----------------------------------------------------------------------------
def test_spec_and_observation_validation_name_the_key():
    with pytest.raises(
        ObservationError, match=r"observation 'obs': .* expects per-step shape \(20,\), .* provides \(5,\)"
    ):
        check_spec({"obs": [20]}, 2, {"obs": (5,)}, 2)
    with pytest.raises(ObservationError, match=r"key 'image' .* not provided"):
        check_spec({"image": [3, 96, 96], "agent_pos": [2]}, 2, {"obs": (20,)}, 2)
    with pytest.raises(ObservationError, match="action_dim: policy outputs 20, robot takes 2"):
        check_spec({"obs": [20]}, 20, {"obs": (20,)}, 2)
    good = {"obs": np.zeros((2, 20), np.float32), "timestamp": np.zeros(2)}
    validate_observation(good, {"obs": [20]}, 2)
    with pytest.raises(ObservationError, match="key 'obs' missing"):
        validate_observation({"timestamp": np.zeros(2)}, {"obs": [20]}, 2)
    with pytest.raises(ObservationError, match="'timestamp' missing"):
        validate_observation({"obs": good["obs"]}, {"obs": [20]}, 2)
    with pytest.raises(ObservationError, match="NaN"):
        validate_observation({**good, "obs": np.full((2, 20), np.nan, np.float32)}, {"obs": [20]}, 2)


def test_sustainable_rate():
    assert sustainable(0.05, "sync", 8, 10.0) == (True, pytest.approx(20.0))
    ok, rate = sustainable(0.5, "sync", 8, 10.0)
    assert not ok and rate == pytest.approx(2.0)
    # async, Ta = 8: a chunk arrives ceil(L/dt) ticks late and the next one needs as long again
    assert sustainable(0.3, "async", 8, 10.0)[0]  # 3 + 3 <= 8
    ok, rate = sustainable(0.5, "async", 8, 10.0)  # 5 + 5 > 8 (it is shorter than the chunk's 0.8 s)
    assert not ok and rate == pytest.approx(8.0)  # floor(8 / 2) / 0.5 s
    assert sustainable(0.5, "async", 8, rate)[0]  # and at that rate it fits exactly (4 + 4)
    assert not sustainable(0.45, "async", 7, 10.0)[0] and sustainable(0.3, "async", 7, 10.0)[0]


def test_deploy_verb_rejects_mismatched_robot_before_moving(ckpt, tmp_path):
    with pytest.raises(ObservationError, match=r"observation 'obs'.*\(20,\).*sim_pusht provides \(5,\)"):
        cli.run_verb("deploy", [f"checkpoint={ckpt}", "robot.obs_type=state", f"run_dir={tmp_path}"])


def test_deploy_verb_reports_timing_and_score(ckpt, tmp_path, capsys):
    res = cli.run_verb(
        "deploy", [f"checkpoint={ckpt}", "hz=50", "n_steps=30", "warmup=2", "mode=async", f"run_dir={tmp_path}"]
    )
    for k in ("cycle_p50_ms", "cycle_p99_ms", "jitter_p99_ms", "inference_p99_ms", "deadline_misses", "mean_score"):
        assert k in res
    assert 0.0 <= res["mean_score"] <= 1.0 and res["cycles"] + res["skipped_ticks"] <= 30
    err = capsys.readouterr().err
    assert "warm-up" in err and "[async 50 Hz]" in err


def test_warm_started_policy_fn_aligns_the_prior_by_timestamps_and_forgets_it_on_reset(policy):
    """deploy warm_start=tau: the prior of each chunk is the previous window shifted by the control ticks between
    the two observations (timestamps x hz); a new episode id, a warm-up reset or an implausible shift start from
    noise."""
    seen = []
    real = policy.predict_chunk

    def spy(obs, steps=None, generator=None, prior=None, **kw):
        acts, window = real(obs, steps=steps, generator=generator, prior=prior, **kw)
        seen.append((prior, window))
        return acts, window

    policy.warm_start = 0.5
    policy.predict_chunk = spy
    try:
        fn = make_policy_fn(policy, 1, seed=0, hz=10.0)
        assert fn.accepts_timestamps and fn.accepts_episodes
        frame = {"obs": np.zeros((2, 20), np.float32), "episode": np.array([0, 0])}
        fn({**frame, "timestamp": np.array([0.0, 0.1])})
        fn({**frame, "timestamp": np.array([0.3, 0.4])})  # 3 ticks later
        fn({**frame, "timestamp": np.array([0.4, 0.5]), "episode": np.array([0, 1])})  # reset: from noise
        fn.reset()
        fn({**frame, "timestamp": np.array([0.5, 0.6]), "episode": np.array([1, 1])})  # after reset(): from noise
        fn({**frame, "timestamp": np.array([9.5, 9.6]), "episode": np.array([1, 1])})  # 90 ticks: from noise
        assert [p is None for p, _ in seen] == [True, False, True, True, True]
        torch.testing.assert_close(seen[1][0], policy.next_prior(seen[0][1], 3))
        with pytest.raises(ValueError, match="needs the control rate hz"):
            make_policy_fn(policy, 1, hz=None)
    finally:
        del policy.predict_chunk
        policy.warm_start = None


def test_deploy_verb_with_warm_start(ckpt, tmp_path):
    res = cli.run_verb(
        "deploy",
        [f"checkpoint={ckpt}", "hz=50", "n_steps=20", "warmup=2", "mode=sync", "warm_start=0.5", f"run_dir={tmp_path}"],
    )
    assert 0.0 <= res["mean_score"] <= 1.0 and res["cycles"] > 0
    with pytest.raises(ValueError, match="warm_start=0.3"):
        cli.run_verb("deploy", [f"checkpoint={ckpt}", "n_steps=5", "warm_start=0.3", f"run_dir={tmp_path / 'b'}"])
