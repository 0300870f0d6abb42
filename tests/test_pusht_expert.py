"""Scripted Push-T expert and demonstration files (real physics)."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from shortcut_policy.commands.demos import demos_command
from shortcut_policy.envs import pusht as P
from shortcut_policy.envs.experts.pusht import PushTExpert, dist_to_tee_local, pusht_episode, track_waypoints
from shortcut_policy.envs.pusht import PushTEnv


def _run(seed, expert_seed=0, max_steps=300):
    env = PushTEnv(obs_type="state", max_steps=max_steps)
    env.reset(seed=seed)
    ex = PushTExpert(seed=expert_seed)
    ex.reset(env)
    actions = []
    for _ in range(max_steps):
        a = ex.act(env)
        actions.append(a)
        _, _, term, trunc, info = env.step(a)
        if term or trunc:
            break
    return term, np.array(actions), info


def test_deadbeat_tracking_lands_on_waypoints():
    env = PushTEnv(obs_type="state")
    env.reset(seed=0)
    env.set_state([100.0, 100.0, 400.0, 400.0, 0.0])
    wps = [np.array([100.0 + 15 * k, 100.0 + 5 * k]) for k in range(1, 9)]
    U, sub_p, sub_v, Ps, Vs = track_waypoints([100.0, 100.0], [0.0, 0.0], wps)
    for k, u in enumerate(U):
        env.step(u)
        assert env.get_state()[:2] == pytest.approx(wps[k], abs=1e-6)
        assert env.get_state()[5:7] == pytest.approx(sub_v[k, -1], abs=1e-6)


def test_model_predicts_the_env_exactly():
    env = PushTEnv(obs_type="state")
    env.reset(seed=100003)
    ex = PushTExpert(seed=0)
    ex.reset(env)
    for _ in range(3):  # three primitives: each includes contact
        targets = ex.plan(env)
        pred = ex.last_prediction
        for u in targets:
            _, _, term, _, _ = env.step(u)
        st = env.get_state()
        assert st[2:4] == pytest.approx(pred.final_pose[0], abs=1e-4)
        assert st[4] == pytest.approx(pred.final_pose[1], abs=1e-6)
        if term:
            break


@pytest.mark.parametrize("seed", [100000, 7])
def test_expert_solves_episodes(seed):
    term, actions, info = _run(seed)
    assert term and info["coverage"] > 0.95
    # smooth travel: the agent moves at most ~ travel speed (17 px) per step, targets stay near the arena
    assert np.all(np.isfinite(actions)) and np.abs(actions).max() < 800


def test_expert_is_seeded():
    _, a1, _ = _run(100001, expert_seed=1, max_steps=25)
    _, a2, _ = _run(100001, expert_seed=1, max_steps=25)
    _, a3, _ = _run(100001, expert_seed=2, max_steps=25)
    assert np.array_equal(a1, a2)
    assert a1.shape != a3.shape or not np.allclose(a1, a3)


def test_episode_recording_layout():
    ep = pusht_episode(100000, expert_seed=0, render=True)
    d = ep["data"]
    n = ep["n_steps"]
    assert ep["success"] and n == len(d["action"])
    assert d["img"].shape == (n, 96, 96, 3) and d["img"].dtype == np.uint8
    assert d["state"].shape == (n, 5) and d["keypoint"].shape == (n, 9, 2) and d["n_contacts"].shape == (n, 1)
    # obs at t is recorded before action t: the first state is the reset state
    env = PushTEnv(obs_type="state")
    _, info = env.reset(seed=100000)
    assert d["state"][0] == pytest.approx(info["state"].astype(np.float32))
    # keypoints are the transformed local keypoints of the recorded state
    kp = P.keypoints_global(P.compute_local_keypoints(), d["state"][5, 2:4], d["state"][5, 4])
    assert d["keypoint"][5] == pytest.approx(kp, abs=1e-3)
    assert d["n_contacts"].max() > 0  # the expert pushes


def test_demos_command_writes_dp_zarr(tmp_path):
    from shortcut_policy.datasets.replay_buffer import ReplayBuffer

    out = tmp_path / "demo.zarr"
    cfg = OmegaConf.create(
        {
            "task": "pusht",
            "n_episodes": 2,
            "out": str(out),
            "workers": 1,
            "seed": 100000,
            "expert_seed": 0,
            "max_steps": 300,
            "images": True,
            "overwrite": False,
        }
    )
    res = demos_command(cfg, tmp_path)
    assert res["n_episodes"] == 2 and res["n_dropped"] == 0 and res["out"] == str(out) and res["seconds"] > 0
    rb = ReplayBuffer.copy_from_path(out)
    assert rb.n_episodes == 2 and rb.episode_ends.dtype == np.int64
    assert set(rb.keys()) == {"img", "state", "keypoint", "action", "n_contacts"}
    assert rb["img"].dtype == np.float32 and rb["img"].shape[1:] == (96, 96, 3) and rb["img"].max() <= 255
    assert rb["img"].max() > 200
    assert rb["keypoint"].shape[1:] == (9, 2) and rb["state"].shape[1:] == (5,)
    import zarr

    g = zarr.open_group(str(out), mode="r")
    assert g.metadata.zarr_format == 2 and list(g.attrs["episode_seeds"]) == [100000, 100001]
    assert not list(tmp_path.glob(".demo.zarr.tmp*"))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        demos_command(cfg, tmp_path)
    cfg.overwrite, cfg.n_episodes, cfg.images = True, 1, False
    assert demos_command(cfg, tmp_path)["n_episodes"] == 1
    assert ReplayBuffer.copy_from_path(out).n_episodes == 1


def test_demos_bad_arguments(tmp_path):
    base = {"task": "pusht", "n_episodes": 1, "out": str(tmp_path / "x.zarr"), "workers": 1}
    with pytest.raises(ValueError, match="unknown task='pushy'"):
        demos_command(OmegaConf.create({**base, "task": "pushy"}), tmp_path)
    with pytest.raises(ValueError, match="unknown task='pushy'"):
        demos_command(OmegaConf.create({**base, "task": {"env": "pushy"}}), tmp_path)
    from shortcut_policy.cli import compose

    assert compose("demos", ["task=pusht", "n_episodes=3"]).task.env == "pusht"  # `demos task=pusht` composes
    with pytest.raises(ValueError, match="seed=0.5"):
        demos_command(OmegaConf.create({**base, "seed": 0.5}), tmp_path)
    with pytest.raises(ValueError, match="n_episodes=0"):
        demos_command(OmegaConf.create({**base, "n_episodes": 0}), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("start", [100000, 0])
def test_expert_success_rate_50_seeds(start):
    wins = [_run(s)[0] for s in range(start, start + 50)]
    assert np.mean(wins) >= 0.98


@pytest.mark.slow
def test_demos_parallel_workers(tmp_path):
    cfg = OmegaConf.create(
        {"task": "pusht", "n_episodes": 4, "out": str(tmp_path / "p.zarr"), "workers": 2, "seed": 0, "images": False}
    )
    res = demos_command(cfg, tmp_path)
    assert res["n_episodes"] == 4 and res["workers"] == 2


def test_geometry_helper():
    assert dist_to_tee_local(np.array([[0.0, 15.0], [0.0, 60.0]])).tolist() == [0.0, 0.0]
    assert dist_to_tee_local(np.array([[0.0, -10.0], [30.0, 60.0]])) == pytest.approx([10.0, 15.0])


def test_evaluation_renders_the_recorded_image_observation():
    """The image observation of the evaluation env equals the recorded 96x96 frame pixel for pixel: the policy is
    evaluated on exactly the images it was trained on (same renderer, size and colours). Checked twice: replaying the
    episode's actions from its seed (the evaluation path), and putting a fresh env into a recorded state (set_state
    must refresh pymunk's cached shapes, or the frame shows the block where it was before)."""

    def as_uint8(obs):  # (3, 96, 96) float32 in [0, 1], as the policy sees it -> the stored HWC uint8 layout
        assert obs["image"].shape == (3, 96, 96)
        return np.rint(np.moveaxis(obs["image"], 0, -1) * 255.0).astype(np.uint8)

    ep = pusht_episode(100002, expert_seed=0, max_steps=40, render=True)
    d = ep["data"]
    env = PushTEnv(obs_type="image")
    obs, _ = env.reset(seed=100002)
    for t in range(len(d["action"])):
        np.testing.assert_array_equal(as_uint8(obs), d["img"][t])
        obs = env.step(d["action"][t])[0]
    fresh = PushTEnv(obs_type="image")
    fresh.reset(seed=0)
    for t in (0, 10, len(d["action"]) - 1):
        fresh.set_state(d["state"][t].astype(np.float64))
        np.testing.assert_array_equal(as_uint8(fresh._get_obs()), d["img"][t])
