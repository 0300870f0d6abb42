"""Parallel rollout evaluation: expert in workers, learned-policy protocol, crash/timeout reporting, metrics."""

import json
import os
import time

import numpy as np
import pytest

from shortcut_policy.eval import report
from shortcut_policy.eval.rollout import check_int, evaluate, make_env

TASK = {
    "name": "pusht_lowdim",
    "env": "pusht",
    "obs_type": "keypoints",
    "obs_keys": {"obs": [20]},
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "max_steps": 300,
    "control_hz": 10,
}


# --- experts / policies used by the tests (imported by name inside the spawned workers) ---------------------
class CrashingExpert:
    """Kills its worker process on an even seed; holds the agent still on odd seeds."""

    def __init__(self, seed):
        self.seed = seed

    def reset(self, env):
        if self.seed % 2 == 0:
            os._exit(3)

    def act(self, env):
        return env.unwrapped.get_state()[:2].copy()


class HangingExpert(CrashingExpert):
    def reset(self, env):
        if self.seed % 2 == 0:
            time.sleep(3600)


class ChasePolicy:
    """A deterministic closed-loop policy on keypoint observations: drive the agent into the block's keypoint
    centre. Records the batches it was given."""

    def __init__(self):
        self.calls = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def predict_action(self, obs, steps=1):
        o = obs["obs"]
        self.calls.append((o.shape, steps))
        centre = o[:, -1, :18].reshape(-1, 9, 2).mean(axis=1)
        agent = o[:, -1, 18:]
        frac = np.linspace(0.2, 1.0, 8)[None, :, None]
        return agent[:, None] + frac * (centre - agent)[:, None]


# --- tests ------------------------------------------------------------------------------------------------
def test_expert_eval_through_cli(tmp_path):
    from shortcut_policy.cli import run_verb

    res = run_verb(
        "eval",
        [
            "policy=expert",
            "task=pusht_lowdim",
            "n_episodes=2",
            "seed_start=100000",
            "workers=2",
            "n_videos=1",
            "progress=false",
            f"run_dir={tmp_path}",
        ],
    )
    assert res["n_episodes"] == 2 and res["success_rate@1"] == 1.0 and res["mean_score@1"] == 1.0
    lo, hi = res["success_ci95@1"]
    assert 0.0 < lo < 1.0 and hi == 1.0
    rows = json.loads((tmp_path / "per_seed.json").read_text())
    assert [r["seed"] for r in rows] == [100000, 100001] and all(r["status"] == "ok" for r in rows)
    assert all(0 < r["env_steps"] < 300 for r in rows)
    assert (tmp_path / "per_seed.csv").read_text().startswith("steps,seed,max_reward,success")
    assert len(list((tmp_path / "videos").iterdir())) == 1 and (tmp_path / "score_vs_steps.png").stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["success_rate@1"] == 1.0


def test_learned_policy_protocol(tmp_path):
    task = dict(TASK, max_steps=36)
    pol = ChasePolicy()
    res = evaluate(
        task,
        policy=pol,
        steps_list=[1, 4],
        n_episodes=3,
        seed_start=100000,
        n_workers=2,
        n_videos=0,
        run_dir=tmp_path,
        progress=False,
    )
    rows = json.loads((tmp_path / "per_seed.json").read_text())
    assert len(rows) == 6 and {r["steps"] for r in rows} == {1, 4}
    assert pol.resets == 2
    # batched over the running envs with To=2 stacked observations; steps passed through
    assert pol.calls[0] == ((3, 2, 20), 1) and {c[1] for c in pol.calls} == {1, 4}
    # 36 inner steps = 4 chunks of 8 + 4: every episode truncated at max_steps unless it succeeded
    for r in rows:
        assert r["status"] == "ok" and (r["env_steps"] == 36 or r["success"])
    scores = [r["max_reward"] for r in rows if r["steps"] == 4]
    assert res["mean_score@4"] == pytest.approx(np.mean(scores))
    # a deterministic policy on fixed seeds gives the same per-seed scores for every N
    assert [r["max_reward"] for r in rows if r["steps"] == 1] == scores
    with pytest.raises(ValueError, match="steps=3"):
        evaluate(task, policy=pol, steps_list=[3], n_episodes=1, progress=False)


def test_envs_per_worker_runs_seeds_in_waves_with_the_same_results(tmp_path):
    task = dict(TASK, max_steps=24)
    at_once = evaluate(
        task, policy=ChasePolicy(), n_episodes=3, seed_start=100000, n_workers=1, progress=False, run_dir=tmp_path / "a"
    )
    pol = ChasePolicy()
    waves = evaluate(
        task,
        policy=pol,
        n_episodes=3,
        seed_start=100000,
        n_workers=1,
        progress=False,
        envs_per_worker=1,
        run_dir=tmp_path / "b",
    )
    assert {c[0][0] for c in pol.calls} == {1}  # one env alive at a time: the policy sees batches of 1
    rows_a = json.loads((tmp_path / "a" / "per_seed.json").read_text())
    rows_b = json.loads((tmp_path / "b" / "per_seed.json").read_text())
    assert [(r["seed"], r["max_reward"]) for r in rows_b] == [(r["seed"], r["max_reward"]) for r in rows_a]
    assert waves["mean_score@1"] == pytest.approx(at_once["mean_score@1"])
    with pytest.raises(ValueError, match="envs_per_worker"):
        evaluate(task, policy=pol, n_episodes=2, envs_per_worker=0, progress=False)


def test_crashed_worker_is_reported_with_its_seed():
    task = dict(TASK, max_steps=5)
    t0 = time.time()
    res = evaluate(
        task,
        policy=None,
        n_episodes=2,
        seed_start=10,
        n_workers=2,
        expert_spec="test_rollout:CrashingExpert",
        progress=False,
    )
    assert time.time() - t0 < 120
    assert res["crashed_seeds@1"] == [10]
    assert res["success_rate@1"] == 0.0 and res["n_episodes"] == 2


def test_hanging_worker_times_out():
    task = dict(TASK, max_steps=5)
    res = evaluate(
        task,
        policy=None,
        n_episodes=2,
        seed_start=20,
        n_workers=2,
        expert_spec="test_rollout:HangingExpert",
        timeout=4,
        progress=False,
    )
    assert res["crashed_seeds@1"] == [20]


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed_start=1.5"):
        evaluate(TASK, n_episodes=1, seed_start=1.5)
    with pytest.raises(ValueError, match="seed_start='abc'"):
        evaluate(TASK, n_episodes=1, seed_start="abc")
    with pytest.raises(ValueError, match="n_episodes=0"):
        evaluate(TASK, n_episodes=0)
    with pytest.raises(ValueError, match="env='mujoco_soccer'"):
        make_env(dict(TASK, env="mujoco_soccer"))
    with pytest.raises(ValueError, match="obs_type 'rgb'"):
        make_env(dict(TASK, obs_type="rgb"))
    assert check_int("x", 1e5) == 100000
    from omegaconf import OmegaConf

    from shortcut_policy.commands.eval import eval_command

    with pytest.raises(ValueError, match="needs checkpoint=PATH"):
        eval_command(OmegaConf.create({"policy": "checkpoint", "task": TASK}), "/tmp")
    with pytest.raises(ValueError, match="policy='random'"):
        eval_command(OmegaConf.create({"policy": "random", "task": TASK}), "/tmp")
    with pytest.raises(ValueError, match="seed_start=0.25"):
        eval_command(OmegaConf.create({"policy": "expert", "task": TASK, "seed_start": 0.25}), "/tmp")


def test_wilson_interval_and_summary(tmp_path):
    lo, hi = report.wilson_interval(50, 50)
    assert lo == pytest.approx(0.9287, abs=1e-4) and hi == 1.0
    lo, hi = report.wilson_interval(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0713, abs=1e-4)
    lo, hi = report.wilson_interval(25, 50)
    assert lo == pytest.approx(0.3664, abs=1e-3) and hi == pytest.approx(0.6336, abs=1e-3)
    rows = [
        {"seed": 1, "max_reward": 1.0, "success": True, "status": "ok"},
        {"seed": 2, "max_reward": 0.5, "success": False, "status": "ok"},
        {"seed": 3, "max_reward": 0.9, "success": False, "status": "crashed"},
    ]
    m = report.summarize(rows, 4)
    assert m["mean_score@4"] == pytest.approx(0.5) and m["success_rate@4"] == pytest.approx(1 / 3)
    assert m["crashed_seeds@4"] == [3]
    assert "stage_rate@4" not in m  # Push-T reports no stages
    rows[0]["stages"], rows[1]["stages"] = {"lid_off": 90, "trash_in_bin": 150}, {"lid_off": 110}
    assert list(m2 := report.summarize(rows, 4)["stage_rate@4"]) == ["lid_off", "trash_in_bin"]
    assert m2 == {"lid_off": pytest.approx(2 / 3), "trash_in_bin": pytest.approx(1 / 3)}
    assert report.plot_stages(m, tmp_path / "none.png") is None
    png = report.plot_stages({"stage_rate@1": m2, "stage_rate@4": {"lid_off": 1.0}}, tmp_path / "stages.png")
    assert png.is_file() and png.stat().st_size > 1000


class RampPolicy:
    """For the temporal-ensembling test on the toy reach env: call c of episode 0 predicts, for the chunk's action k,
    p0 + v (c + k + 1) + e c (p0 = the start position): every prediction for one env step agrees up to the offset
    e c of the chunk that made it, so the executed action shows how the predictions were weighted. Steps are smaller
    than the env's speed limit, so the observed position after a step IS the executed action."""

    V, E = np.array([0.02, 0.01]), np.array([0.003, -0.002])

    def __init__(self, ta: int):
        self.ta, self.seen, self.p0 = ta, [], None

    def predict_action(self, obs, steps=1):
        pos = obs["obs"][:, -1, :2].astype(np.float64)
        if self.p0 is None:
            self.p0 = pos[0].copy()
        c = len(self.seen)
        self.seen.append(pos[0].copy())
        k = np.arange(self.ta)[:, None]
        return (self.p0 + self.V * (c + k + 1) + self.E * c)[None].astype(np.float32)


@pytest.mark.parametrize("k", [0.0, 0.5])
def test_temporal_ensembling_executes_the_weighted_mean_of_overlapping_predictions(k):
    """eval ensemble_k=k: one policy call per env step; the action executed at step t is sum_i w_i a_i / sum_i w_i
    over the chunks covering t, w_i = exp(-k i), i = 0 the oldest (ACT), as the deploy loop's ActionQueue."""
    import toy_reach_env as toy

    from shortcut_policy.envs import registry

    registry.register_env("toy_reach_ens", registry.EnvSpec(make=toy.make), replace=True)
    try:
        task = {
            "name": "toy",
            "env": "toy_reach_ens",
            "obs_shapes": {"obs": [4]},
            "n_obs_steps": 2,
            "n_action_steps": 4,
            "max_steps": 10,
            "control_hz": 50,
        }
        pol = RampPolicy(ta=4)
        evaluate(task, policy=pol, steps_list=[1], n_episodes=1, n_workers=1, progress=False, ensemble_k=k)
        assert len(pol.seen) == 10  # replanned at every env step (not every 4th)
        for t in range(9):  # the position seen at call t + 1 is the action executed at step t
            calls = np.arange(max(0, t - 3), t + 1)  # the chunks covering step t, oldest first
            w = np.exp(-k * np.arange(len(calls)))
            want = pol.p0 + RampPolicy.V * (t + 1) + RampPolicy.E * (w @ calls) / w.sum()
            np.testing.assert_allclose(pol.seen[t + 1], want, atol=1e-5)
        # without ensembling the chunks run whole: 10 steps = 3 calls (4 + 4 + 2)
        pol = RampPolicy(ta=4)
        evaluate(task, policy=pol, steps_list=[1], n_episodes=1, n_workers=1, progress=False)
        assert len(pol.seen) == 3
        with pytest.raises(ValueError, match="ensemble_k=-1"):
            evaluate(task, policy=RampPolicy(ta=4), steps_list=[1], n_episodes=1, progress=False, ensemble_k=-1)
    finally:
        registry.unregister_env("toy_reach_ens")
