"""Scripted Transport expert: action format, early progress (fast), full episodes and demos (slow)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

pytest.importorskip("robosuite", reason="robosuite is in the 'sim' extra")

from shortcut_policy.envs import transport as T  # noqa: E402
from shortcut_policy.envs.experts.transport import (  # noqa: E402
    TransportExpert,
    delta_to_abs_action,
    run_expert_episode,
)


@pytest.fixture(scope="module")
def env():
    e = T.TransportEnv(obs_keys=["obs"], enable_render=False, track_stages=True)
    yield e
    e.close()


def test_expert_first_phases(env):
    """Within 90 steps robot0 has lifted the lid off the start bin and robot1 holds the trash cube up."""
    env.reset(seed=100000)
    ex = TransportExpert(seed=0).reset(env)
    lid0 = ex._lid_handle()[0].copy()
    trash0 = ex._trash()[0].copy()
    for _ in range(90):
        a = ex.act(env)
        assert a.shape == (14,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
        _, _, _, _, info = env.step(a)
    lid, trash = ex._lid_handle()[0], ex._trash()[0]
    # the env's diagnostic stages (privileged state) saw both grasps, at steps inside the episode, and nothing later
    st = info["stages"]
    assert {"lid_grasped", "trash_grasped"} <= set(st) and all(0 < v <= 90 for v in st.values()), st
    assert not {"hammer_grasped_robot1", "hammer_in_target_bin", "success"} & set(st), st
    assert lid[2] - lid0[2] > 0.05, (ex.phases, ex.events)
    assert trash[2] - trash0[2] > 0.05 or ex.arms[1].phase in ("trash_lift", "trash_move"), (ex.phases, ex.events)
    assert ex.arms[0].phase in ("lid_move", "lid_lower"), ex.phases


def test_expert_noise_is_seeded(env):
    env.reset(seed=100000)
    a = TransportExpert(seed=3, action_noise=0.1).reset(env).act(env)
    b = TransportExpert(seed=3, action_noise=0.1).reset(env).act(env)
    c = TransportExpert(seed=3, action_noise=0.0).reset(env).act(env)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_expert_abs_action_matches_delta_goal(env):
    env.reset(seed=100000)
    ex = TransportExpert(seed=0).reset(env)
    d = ex.act_delta(env)
    ab = delta_to_abs_action(ex, d)
    assert ab.shape == (20,)
    p, _ = ex._site(0)
    np.testing.assert_allclose(ab[:3], p + d[:3] * 0.05)
    np.testing.assert_allclose(ab[9], d[6])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [100000, 100001])
def test_expert_solves_episode(seed):
    r = run_expert_episode(seed)
    assert r["success"], r
    assert r["success_step"] < 650


@pytest.mark.slow
def test_expert_with_action_noise():
    r = run_expert_episode(100002, action_noise=0.1)
    assert r["success"], r


@pytest.mark.slow
def test_expert_on_abs_env_succeeds():
    e = T.TransportEnv(obs_keys=["obs"], abs_action=True, enable_render=False)
    try:
        r = run_expert_episode(100003, env=e)
        assert r["success"], r
    finally:
        e.close()


@pytest.mark.slow
def test_demos_command_writes_hdf5_and_zarr(tmp_path):
    from omegaconf import OmegaConf

    from shortcut_policy.datasets.replay_buffer import ReplayBuffer
    from shortcut_policy.datasets.robomimic import read_env_meta
    from shortcut_policy.envs.experts.transport import demos

    cfg = OmegaConf.create(
        {
            "task": "transport",
            "n_episodes": 2,
            "out": str(tmp_path / "demo"),
            "workers": 2,
            "seed": 0,
            "overwrite": False,
        }
    )
    res = demos(cfg, tmp_path)
    assert res["n_episodes"] == 2
    meta = read_env_meta(res["hdf5"])
    assert meta["env_kwargs"]["controller_configs"]["control_delta"] is True
    assert read_env_meta(res["hdf5_abs"])["env_kwargs"]["controller_configs"]["control_delta"] is False
    rb = ReplayBuffer.copy_from_path(res["zarr"])
    rb_abs = ReplayBuffer.copy_from_path(res["zarr_abs"])
    assert rb.n_episodes == 2 and rb["action"].shape[1] == 14 and rb_abs["action"].shape[1] == 20
    assert rb["object"].shape[1] == 41
    # replaying the recorded delta actions from the recorded start state re-creates the success
    import h5py

    env = T.TransportEnv(read_env_meta(res["hdf5"]), obs_keys=["obs"], enable_render=False)
    try:
        with h5py.File(res["hdf5"], "r") as f:
            g = f["data/demo_0"]
            env.reset(seed=0)
            env.reset_to(g["states"][0])
            ok = False
            for a in g["actions"][:]:
                ok |= env.step(a)[4]["success"]
        assert ok
    finally:
        env.close()
    with pytest.raises(FileExistsError):
        demos(cfg, tmp_path)


@pytest.mark.slow
def test_expert_recovers_from_failed_grasp(env):
    """Move the hammer away while robot0's fingers close on it: the grasp check fails, robot0 re-opens, comes
    back to the hammer's new pose and picks it up."""
    env.reset(seed=100005)
    ex = TransportExpert(seed=0).reset(env)
    moved = False
    for _ in range(650):
        env.step(ex.act(env))
        if not moved and ex.arms[0].phase == "ham_close":
            rs = env.env
            jn = rs.transport.payload.joints[0]
            q = rs.sim.data.get_joint_qpos(jn).copy()
            q[0] -= 0.10  # 10 cm along x (across the fingers): they close on air
            rs.sim.data.set_joint_qpos(jn, q)
            rs.sim.forward()
            moved = True
        if ex.arms[0].phase == "ham_carry":
            break
    assert moved
    msgs = [m for _, i, m in ex.events if i == 0]
    assert any("retry ham_grasp" in m for m in msgs), ex.events
    assert ex.arms[0].phase == "ham_carry", (ex.phases, ex.events)


def test_recorded_episode_to_robomimic_and_zarr(env, tmp_path):
    """The demos pipeline on a short recorded episode: robomimic hdf5 (delta + abs) -> zarr, states replayable."""
    from shortcut_policy.datasets.replay_buffer import ReplayBuffer
    from shortcut_policy.datasets.robomimic import RobomimicHdf5Writer, read_env_meta, robomimic_to_replay_buffer
    from shortcut_policy.envs.experts.transport import _recorded_to_demo

    r = run_expert_episode(100000, max_steps=6, env=env, record=True)
    d = _recorded_to_demo(r["record"], ())
    assert d["actions"].shape == (6, 14) and d["actions_abs"].shape == (6, 14) and d["states"].shape[0] == 6
    assert d["obs"]["object"].shape == (7, 41)  # N + 1 rows: the last is the final observation
    # the absolute action is the goal the delta controller set: goal pos = eef site pos + 0.05 * delta
    site0 = env.env.robots[0].part_controllers["right"].ref_name
    assert np.all(np.abs(d["actions_abs"][:, :3] - d["obs"]["robot0_eef_pos"][:6]) < 0.1)
    for name, key, delta in (("low_dim.hdf5", "actions", True), ("low_dim_abs.hdf5", "actions_abs", False)):
        meta = T.default_env_meta(abs_action=not delta)
        with RobomimicHdf5Writer(tmp_path / name, meta) as w:
            w.add_demo(obs=d["obs"], actions=d[key], states=d["states"], rewards=d["rewards"])
        assert read_env_meta(tmp_path / name)["env_kwargs"]["controller_configs"]["control_delta"] is delta
    robomimic_to_replay_buffer(
        tmp_path / "low_dim_abs.hdf5", list(T.LOWDIM_SHAPES), abs_action=True, out_path=tmp_path / "low_dim_abs.zarr"
    )
    rb2 = ReplayBuffer.copy_from_path(tmp_path / "low_dim_abs.zarr")
    assert rb2["action"].shape == (6, 20) and rb2.n_episodes == 1 and site0
    # states[0] restores the start observation
    env.reset(seed=100001)
    env.reset_to(d["states"][0])
    np.testing.assert_allclose(env.raw_obs()["object-state"], d["obs"]["object"][0], atol=1e-6)


def test_clean_labels_dart(env):
    """label='clean': without noise identical to the executed labels; with noise the labels are the expert's own
    commands (not the perturbed ones sent), and the absolute label is the goal that command would have set."""
    from shortcut_policy.envs.experts.transport import clean_goal_abs

    ex_ = run_expert_episode(100000, max_steps=12, env=env, record=True)["record"]
    cl = run_expert_episode(100000, max_steps=12, env=env, record=True, label="clean")["record"]
    np.testing.assert_allclose(np.stack(cl["actions"]), np.stack(ex_["actions"]), atol=1e-7)
    np.testing.assert_allclose(np.stack(cl["actions_abs"])[:, :3], np.stack(ex_["actions_abs"])[:, :3], atol=1e-7)
    noisy = run_expert_episode(100000, action_noise=0.2, max_steps=12, env=env, record=True, expert_seed=1)["record"]
    noisy_cl = run_expert_episode(
        100000, action_noise=0.2, max_steps=12, env=env, record=True, expert_seed=1, label="clean"
    )["record"]
    d = np.abs(np.stack(noisy_cl["actions"]) - np.stack(noisy["actions"]))[:, :6]  # noise on the arm dims
    assert d.mean() > 0.05, d.mean()
    # clean_goal_abs: a clean command differing by +1 in x moves the goal by 5 cm; rotation is composed
    goal = np.array([[0.1, 0.2, 1.0, 0.0, 0.0, 0.3], [0.0, 0.0, 1.0, 0.2, 0.0, 0.0]])
    sent = np.zeros(14)
    clean = sent.copy()
    clean[0] = 1.0
    out = clean_goal_abs(goal, sent, clean).reshape(2, 7)
    np.testing.assert_allclose(out[0, :6], [0.15, 0.2, 1.0, 0.0, 0.0, 0.3], atol=1e-9)
    np.testing.assert_allclose(out[1, :6], goal[1], atol=1e-9)
    with pytest.raises(ValueError, match="label"):
        run_expert_episode(100000, max_steps=1, env=env, label="noisy")
