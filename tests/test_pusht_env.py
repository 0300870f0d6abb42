"""Push-T env (real pymunk physics) and the MultiStepWrapper."""

import numpy as np
import pymunk
import pytest

from shortcut_policy.envs import pusht as P
from shortcut_policy.envs.pusht import PushTEnv
from shortcut_policy.envs.wrappers import MultiStepWrapper, VideoRecorder


def test_constants_and_geometry_match_diffusion_policy():
    env = PushTEnv(obs_type="state")
    env.reset(seed=0)
    b, a = env.block, env.agent
    assert b.mass == 1.0
    assert b.moment == pytest.approx(2 * pymunk.moment_for_poly(1.0, P.TEE_BAR))  # DP's inertia bug kept
    assert tuple(b.center_of_gravity) == pytest.approx((0.0, 45.0))
    assert a.body_type == pymunk.Body.KINEMATIC
    assert [s.radius for s in a.shapes] == [15.0]
    assert env.space.damping == 0 and tuple(env.space.gravity) == (0, 0)
    # friction is set on the bodies; shapes keep friction 0 -> frictionless contacts (quirk kept)
    assert all(s.friction == 0 for s in b.shapes) and b.friction == 1
    bar, stem = sorted((np.array(s.get_vertices()) for s in b.shapes), key=lambda v: np.ptp(v[:, 1]))
    assert bar[:, 0].min() == -60 and bar[:, 0].max() == 60 and bar[:, 1].min() == 0 and bar[:, 1].max() == 30
    assert stem[:, 0].min() == -15 and stem[:, 0].max() == 15 and stem[:, 1].max() == 120
    assert P.K_P == 100 and P.K_V == 20 and P.N_SUBSTEPS == 10 and P.DT == 0.01


@pytest.mark.parametrize("seed", [100000, 100049, 0])
def test_legacy_reset_sampler(seed):
    rs = np.random.RandomState(seed)
    ax, ay, bx, by = rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)
    angle = rs.randn() * 2 * np.pi - np.pi
    env = PushTEnv(obs_type="state")
    _, info = env.reset(seed=seed)
    st = info["state"]
    assert st[4] == pytest.approx(angle)
    # legacy order: position set at angle 0 (CoG at pos + (0, 45)), then rotation about the CoG
    cog = np.array([bx, by], float) + [0.0, 45.0]
    c, s = np.cos(angle), np.sin(angle)
    expected_origin = cog - np.array([[c, -s], [s, c]]) @ [0.0, 45.0]
    if np.hypot(ax - cog[0], ay - cog[1]) > 160:  # agent far from the block: the settling step moves nothing
        assert st[:2] == pytest.approx([ax, ay])
        assert st[2:4] == pytest.approx(expected_origin, abs=1e-6)
    # same seed, same start; different seed, different start
    env2 = PushTEnv(obs_type="state")
    assert env2.reset(seed=seed)[1]["state"] == pytest.approx(st)
    assert not np.allclose(env2.reset(seed=seed + 1)[1]["state"], st)


def test_observation_types():
    for obs_type, spec in [
        ("keypoints", {"obs": (20,)}),
        ("state", {"obs": (5,)}),
        ("image", {"image": (3, 96, 96), "agent_pos": (2,)}),
    ]:
        env = PushTEnv(obs_type=obs_type)
        obs, info = env.reset(seed=100000)
        assert isinstance(obs, dict) and set(obs) == set(spec)
        for k, shape in spec.items():
            assert obs[k].shape == shape and obs[k].dtype == np.float32
        assert env.observation_space.contains(obs) or obs_type == "keypoints"
        for key in ("coverage", "success", "n_contacts", "state"):
            assert key in info
    env = PushTEnv(obs_type="image")
    obs, _ = env.reset(seed=3)
    img = obs["image"]
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    obs2, *_ = env.step(obs["agent_pos"] + [60.0, 0.0])
    assert np.abs(obs2["image"] - img).max() > 0.2  # the agent moved in the picture
    frame = env.render()
    assert frame.shape == (env.video_size, env.video_size, 3) and frame.dtype == np.uint8


def test_keypoints_obs_is_transformed_local_keypoints():
    env = PushTEnv(obs_type="keypoints")
    obs, info = env.reset(seed=5)
    kps = obs["obs"][:18].reshape(9, 2)
    st = info["state"]
    c, s = np.cos(st[4]), np.sin(st[4])
    expect = env.local_kps @ np.array([[c, -s], [s, c]]).T + st[2:4]
    assert kps == pytest.approx(expect, abs=1e-3)
    assert obs["obs"][18:] == pytest.approx(st[:2])
    lk = P.compute_local_keypoints()
    assert lk.shape == (9, 2)
    # all keypoints lie on the rendered T (2 px edge + 1 px jitter)
    assert P.tee_world_polygons  # noqa
    from shortcut_policy.envs.experts.pusht import dist_to_tee_local

    assert dist_to_tee_local(lk).max() < 3.5
    assert len({tuple(np.round(k)) for k in lk}) == 9
    # the inverse map (official data -> local keypoints) recovers them
    states = np.array([info["state"], [100.0, 100.0, 300.0, 200.0, 2.0]])
    kp_data = np.stack([P.keypoints_global(lk, s_[2:4], s_[4]) for s_ in states])
    assert P.local_keypoints_from_data(kp_data, states) == pytest.approx(lk)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="obs_type 'pixels'"):
        PushTEnv(obs_type="pixels")
    env = PushTEnv()
    with pytest.raises(ValueError, match="seed=1.5"):
        env.reset(seed=1.5)
    with pytest.raises(ValueError, match="seed='3'"):
        env.reset(seed="3")
    env.reset(seed=1)
    with pytest.raises(ValueError, match="2 finite numbers"):
        env.step([1.0, np.nan])
    with pytest.raises(ValueError, match="2 finite numbers"):
        env.step([1.0, 2.0, 3.0])


def test_coverage_reward_and_success():
    assert P.coverage_of_pose(P.GOAL_POSE[:2], P.GOAL_POSE[2]) == pytest.approx(1.0)
    cov = P.coverage_of_pose(P.GOAL_POSE[:2] + [2.0, 0.0], P.GOAL_POSE[2])
    assert 0.93 < cov < 0.95  # a 2 px offset already fails
    assert P.coverage_of_pose([60.0, 60.0], 0.0) == 0.0
    env = PushTEnv(obs_type="state")
    env.reset(seed=0)
    env.set_state([450.0, 450.0, *P.GOAL_POSE])
    _, reward, terminated, truncated, info = env.step([450.0, 450.0])
    assert reward == 1.0 and terminated and not truncated and info["success"] and info["coverage"] > 0.99
    env.set_state([450.0, 450.0, *(P.GOAL_POSE + [3.0, 0.0, 0.0])])
    _, reward, terminated, _, info = env.step([450.0, 450.0])
    assert not terminated and reward == pytest.approx(np.clip(info["coverage"] / 0.95, 0, 1)) and reward < 1


def test_pd_control_quasi_static_block_and_truncation():
    env = PushTEnv(obs_type="state", max_steps=13)
    env.reset(seed=0)
    env.set_state([100.0, 100.0, 300.0, 300.0, 0.0])
    block0 = env.get_state()[2:5]
    _, _, _, _, info = env.step([130.0, 100.0])
    # closed-form PD response over 10 substeps from rest: x = 100 + 30 * 0.29567...
    assert info["pos_agent"][0] == pytest.approx(100 + 30 * 0.2956717859, abs=1e-6)
    assert env.get_state()[2:5] == pytest.approx(block0)  # untouched block does not move
    # push the block's top face (y = 300 at angle 0): the agent goes down through x = 300
    env.set_state([300.0, 240.0, 300.0, 300.0, 0.0])
    moved, contacts = [], []
    for _ in range(8):
        _, _, _, truncated, info = env.step([300.0, 330.0])
        moved.append(env.get_state()[3])
        contacts.append(info["n_contacts"])
    assert moved[-1] > 300.0 + 5 and max(contacts) > 0
    # quasi-static: once the agent leaves, the block stops at once (damping 0)
    env.step([300.0, 100.0])
    env.step([300.0, 100.0])
    y_after = env.get_state()[3]
    _, _, _, truncated, _ = env.step([300.0, 100.0])
    assert env.get_state()[3] == pytest.approx(y_after)
    assert env.n_steps == 12 and not truncated
    _, _, _, truncated, _ = env.step([300.0, 100.0])
    assert truncated  # max_steps=13


def test_state_roundtrip_reproduces_trajectory():
    a, b = PushTEnv(obs_type="state"), PushTEnv(obs_type="state")
    a.reset(seed=7)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a.step(rng.uniform(100, 400, 2))
    b.reset(seed=123)
    b.set_state(a.get_state())
    assert b.get_state() == pytest.approx(a.get_state(), abs=1e-12)
    target = a.get_state()[2:4]  # drive both agents through the block
    block0 = a.get_state()[2:5]
    for _ in range(12):
        oa = a.step(target)[0]["obs"]
        ob = b.step(target)[0]["obs"]
    assert ob == pytest.approx(oa, abs=1e-3)
    assert np.abs(a.get_state()[2:5] - block0).max() > 1.0  # the block was pushed: contacts were simulated


def test_multistep_wrapper_semantics():
    env = MultiStepWrapper(
        PushTEnv(obs_type="keypoints", max_steps=None), n_obs_steps=2, n_action_steps=8, max_episode_steps=20
    )
    obs, _ = env.reset(seed=100000)
    assert obs["obs"].shape == (2, 20) and np.array_equal(obs["obs"][0], obs["obs"][1])  # first obs repeated
    agent = obs["obs"][-1, 18:].astype(float)
    chunk = agent + np.linspace(0, 40, 8)[:, None] * [1.0, 0.0]
    obs, reward, term, trunc, info = env.step(chunk)
    assert info["executed"] == 8 and env.n_inner_steps == 8
    assert not np.array_equal(obs["obs"][0], obs["obs"][1])
    assert obs["obs"][1, 18] > obs["obs"][0, 18]
    assert reward == pytest.approx(max(env.rewards))
    env.step(chunk)
    obs, reward, term, trunc, info = env.step(chunk)  # 24 > 20: truncated after 4 actions
    assert info["executed"] == 4 and trunc and not term and env.n_inner_steps == 20
    assert env.step(chunk)[4]["executed"] == 0
    # early stop on success, max aggregation of the reward
    env2 = MultiStepWrapper(PushTEnv(obs_type="state"), 2, 8, 300)
    env2.reset(seed=0)
    env2.unwrapped.set_state([450.0, 450.0, *P.GOAL_POSE])
    _, reward, term, trunc, info = env2.step(np.full((8, 2), 450.0))
    assert term and not trunc and info["executed"] == 1 and reward == 1.0
    with pytest.raises(ValueError, match="n_obs_steps=0"):
        MultiStepWrapper(PushTEnv(), 0, 8)


def test_video_recorder_and_make_env(tmp_path):
    from shortcut_policy.envs.wrappers import write_video

    task = {
        "env": "pusht",
        "obs_type": "image",
        "obs_keys": {"image": [3, 96, 96], "agent_pos": [2]},
        "n_obs_steps": 2,
        "n_action_steps": 8,
        "max_steps": 300,
    }
    env = P.make_env(task)
    assert isinstance(env, MultiStepWrapper) and env.unwrapped.obs_type == "image"
    obs, _ = env.reset(seed=1)
    assert obs["image"].shape == (2, 3, 96, 96) and obs["agent_pos"].shape == (2, 2)
    rec = VideoRecorder(PushTEnv(obs_type="state", video_size=64))
    rec.reset(seed=1)
    for _ in range(3):
        rec.step([200.0, 200.0])
    assert len(rec.frames) == 4 and rec.frames[0].shape == (64, 64, 3)
    path = write_video(rec.frames, tmp_path / "v.mp4", fps=10)
    assert (tmp_path / path.split("/")[-1]).stat().st_size > 0
    with pytest.raises(ValueError, match="not Push-T"):
        P.make_env({"env": "transport"})


def test_block_fill_colour_rounds_as_diffusion_policy():
    # DP's light_color: 1.2 x LightSlateGray in float32, capped at 255, then SpaceDebugColor.as_int() ROUNDS:
    # (142.8, 163.2, 183.6) -> (143, 163, 184) (format 1 truncated to (142, 163, 183): one level off in the block)
    assert P._light(P.BLOCK_COLOR) == (143, 163, 184, 255)
    assert P._light(P.AGENT_COLOR) == (78, 126, 255, 255)
    env = PushTEnv(obs_type="image")
    env.reset(seed=0)
    env.set_state([450.0, 450.0, 120.0, 120.0, 0.0])  # block far from the goal and the agent, upright
    for body in (env.block, env.agent):  # set_state does not step: refresh the shapes' cached world vertices
        env.space.reindex_shapes_for_body(body)
    full = env._render_array(P.WINDOW_SIZE, draw_action=False)
    # interior of the stem (local (0, 60)) and of the bar (local (0, 15)) at angle 0: world = local + position
    assert tuple(full[180, 120]) == (143, 163, 184) and tuple(full[135, 100]) == (143, 163, 184)
    obs = env._get_obs()["image"]  # (3, 96, 96) in [0, 1]: the bar's centre, far from its 2 px edges
    y, x = round(135 * 96 / 512), round(120 * 96 / 512)
    assert tuple(np.round(obs[:, y, x] * 255).astype(int)) == (143, 163, 184)
