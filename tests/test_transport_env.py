"""TwoArmTransport through robosuite 1.5 + MuJoCo: env_meta conversion, observations, actions, seeding, rendering."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

pytest.importorskip("robosuite", reason="robosuite is in the 'sim' extra")

from shortcut_policy.envs import transport as T  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"

# env_args exactly as stored in an official robomimic TwoArmTransport hdf5 (robosuite <= 1.4, flat controller)
OFFICIAL_ENV_ARGS = json.dumps(
    {
        "env_name": "TwoArmTransport",
        "type": 1,
        "env_kwargs": {
            "has_renderer": False,
            "has_offscreen_renderer": True,
            "ignore_done": True,
            "use_object_obs": True,
            "use_camera_obs": False,
            "control_freq": 20,
            "controller_configs": {
                "type": "OSC_POSE",
                "input_max": 1,
                "input_min": -1,
                "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
                "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
                "kp": 150,
                "damping": 1,
                "impedance_mode": "fixed",
                "kp_limits": [0, 300],
                "damping_limits": [0, 10],
                "position_limits": None,
                "orientation_limits": None,
                "uncouple_pos_ori": True,
                "control_delta": True,
                "interpolation": None,
                "ramp_ratio": 0.2,
            },
            "robots": ["Panda", "Panda"],
            "env_configuration": "single-arm-opposed",
            "reward_shaping": False,
            "camera_names": ["shouldercamera0", "shouldercamera1", "robot0_eye_in_hand", "robot1_eye_in_hand"],
            "camera_heights": 84,
            "camera_widths": 84,
            "camera_depths": False,
            "render_gpu_device_id": 0,
        },
    }
)


def _gl_available() -> str | None:
    """None when an offscreen MuJoCo GL context can be made, else the reason."""
    try:
        import mujoco

        ctx = mujoco.GLContext(16, 16)
        ctx.make_current()
        ctx.free()
        return None
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"no MuJoCo offscreen GL backend (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {type(e).__name__}: {e}"


def _task_cfg(name):
    from omegaconf import OmegaConf

    return OmegaConf.load(CONFIGS / f"{name}.yaml")


@pytest.fixture(scope="module")
def delta_env():
    env = T.TransportEnv(
        OFFICIAL_ENV_ARGS, obs_keys=["obs"] + list(T.LOWDIM_SHAPES), enable_render=_gl_available() is None
    )
    yield env
    env.close()


@pytest.fixture(scope="module")
def abs_env():
    env = T.make_env(_task_cfg("transport_lowdim"), wrap=False, render=False)
    yield env
    env.close()


def test_old_env_meta_is_converted():
    kw, info = T.convert_env_meta(json.loads(OFFICIAL_ENV_ARGS), source="x.hdf5")
    assert info["old_format"] and info["input_type"] == "delta"
    arm = T._arm_config(kw["controller_configs"])
    assert kw["controller_configs"]["type"] == "BASIC"
    assert arm["type"] == "OSC_POSE" and arm["input_ref_frame"] == "world" and arm["input_type"] == "delta"
    assert kw["lite_physics"] is False
    meta = json.loads(OFFICIAL_ENV_ARGS)
    meta["env_kwargs"]["controller_configs"]["control_delta"] = False
    assert T.convert_env_meta(meta)[1]["input_type"] == "absolute"


def test_bad_env_meta_errors_name_the_problem():
    meta = json.loads(OFFICIAL_ENV_ARGS)
    bad = copy.deepcopy(meta)
    bad["env_name"] = "Lift"
    with pytest.raises(ValueError, match=r"data\.hdf5.*env_name.*'Lift'"):
        T.convert_env_meta(bad, source="data.hdf5")
    bad = copy.deepcopy(meta)
    del bad["env_kwargs"]
    with pytest.raises(KeyError, match="env_kwargs"):
        T.convert_env_meta(bad, source="data.hdf5")
    bad = copy.deepcopy(meta)
    bad["env_kwargs"]["controller_configs"]["type"] = "JOINT_VELOCITY"
    with pytest.raises(ValueError, match="JOINT_VELOCITY"):
        T.convert_env_meta(bad)
    bad = copy.deepcopy(meta)
    bad["type"] = 2
    with pytest.raises(ValueError, match="type"):
        T.convert_env_meta(bad)


def test_env_from_official_env_args(delta_env):
    env = delta_env
    rs = env.env
    arm = rs.robots[0].part_controllers["right"]
    assert arm.input_ref_frame == "world" and arm.input_type == "delta"
    assert type(rs).__name__ == "TwoArmTransport" and len(rs.robots) == 2
    assert env.action_space.shape == (14,) and not env.abs_action
    obs, info = env.reset(seed=100000)
    assert set(obs) == {"obs", *T.LOWDIM_SHAPES}
    assert obs["obs"].shape == (59,) and obs["obs"].dtype == np.float32
    for k, shp in T.LOWDIM_SHAPES.items():
        assert obs[k].shape == shp and obs[k].dtype == np.float32, k
    # DP's concat order
    np.testing.assert_array_equal(obs["obs"], np.concatenate([obs[k] for k in T.LOWDIM_CONCAT_KEYS]))
    assert env.observation_space.contains(obs)
    assert info["success"] is False
    # world-frame delta: +x on both arms moves both grippers toward world +x
    p0 = obs["robot0_eef_pos"].copy(), obs["robot1_eef_pos"].copy()
    a = np.zeros(14)
    a[0] = a[7] = 1.0
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(a)
    assert obs["robot0_eef_pos"][0] - p0[0][0] > 0.02 and obs["robot1_eef_pos"][0] - p0[1][0] > 0.02
    assert abs(obs["robot0_eef_pos"][1] - p0[0][1]) < 0.02
    assert reward == 0.0 and not terminated and not truncated and info["success"] is False
    with pytest.raises(ValueError, match="20 dims, expected 14"):
        env.step(np.zeros(20))


def test_seeded_reset_is_deterministic(delta_env):
    env = delta_env
    a, _ = env.reset(seed=100001)
    s_a = env.get_state()
    b, _ = env.reset(seed=100002)
    c, _ = env.reset(seed=100001)
    np.testing.assert_array_equal(a["obs"], c["obs"])
    np.testing.assert_array_equal(s_a, env.get_state())
    assert not np.allclose(a["object"], b["object"])
    # reset_to a recorded state restores the observation
    env.reset_to(s_a)
    np.testing.assert_allclose(env._convert_obs(env._last_raw)["obs"], a["obs"], atol=1e-6)


def test_terminate_on_success_only_when_asked():
    for flag in (False, True):
        env = T.TransportEnv(
            obs_keys=["robot0_eef_pos"], max_episode_steps=5, enable_render=False, terminate_on_success=flag
        )
        try:
            env.reset(seed=0)
            _, _, term, trunc, info = env.step(np.zeros(14))
            assert not term and not trunc and info["success"] is False  # the start state is not a success
            env.env._check_success = lambda: True  # the task's success predicate now holds
            _, _, term, trunc, info = env.step(np.zeros(14))
            assert info["success"] is True and term is flag and not trunc
        finally:
            env.close()


def test_truncation_after_max_steps():
    env = T.TransportEnv(obs_keys=["robot0_eef_pos"], max_episode_steps=3, enable_render=False)
    try:
        env.reset(seed=0)
        flags = [env.step(np.zeros(14))[3] for _ in range(3)]
        assert flags == [False, False, True]
        assert env.observation_space["robot0_eef_pos"].shape == (3,)
    finally:
        env.close()


def test_abs_env_from_task_config(abs_env):
    env = abs_env
    assert env.abs_action and env.action_space.shape == (20,)
    assert env.env.robots[0].part_controllers["right"].input_type == "absolute"
    obs, _ = env.reset(seed=100000)
    assert obs["obs"].shape == (59,)
    # command the current grip-site poses: the arms stay put
    from shortcut_policy.datasets.robomimic import matrix_to_rot6d

    act = []
    sites = []
    for r in env.env.robots:
        c = r.part_controllers["right"]
        sid = env.env.sim.model.site_name2id(c.ref_name)
        p = env.env.sim.data.site_xpos[sid].copy()
        R = env.env.sim.data.site_xmat[sid].reshape(3, 3)
        sites.append(p)
        act.append(np.concatenate([p, matrix_to_rot6d(R), [-1.0]]))
    act = np.concatenate(act)
    for _ in range(5):
        obs, *_ = env.step(act)
    for i, r in enumerate(env.env.robots):
        c = r.part_controllers["right"]
        sid = env.env.sim.model.site_name2id(c.ref_name)
        assert np.linalg.norm(env.env.sim.data.site_xpos[sid] - sites[i]) < 0.01
    # a 5 cm absolute target in world +z for robot0 moves it up
    act2 = act.copy()
    act2[2] += 0.05
    for _ in range(15):
        env.step(act2)
    sid = env.env.sim.model.site_name2id(env.env.robots[0].part_controllers["right"].ref_name)
    assert env.env.sim.data.site_xpos[sid][2] - sites[0][2] > 0.035


def test_render_frame(delta_env):
    reason = _gl_available()
    if reason is not None:
        pytest.skip(reason)
    delta_env.reset(seed=100000)
    frame = delta_env.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    assert frame.std() > 5, "blank frame"


def test_image_obs_from_task_config():
    reason = _gl_available()
    if reason is not None:
        pytest.skip(reason)
    cfg = _task_cfg("transport_image")
    env = T.make_env(cfg, wrap=False)
    try:
        assert not env.env.use_object_obs
        obs, _ = env.reset(seed=100000)
        assert set(obs) == set(cfg.obs_shapes)
        for k, shp in cfg.obs_shapes.items():
            assert obs[k].shape == tuple(shp) and obs[k].dtype == np.float32, k
        for k in T.IMAGE_KEYS:
            assert 0.0 <= obs[k].min() and obs[k].max() <= 1.0 and obs[k].std() > 0.01, k
        obs, *_ = env.step(_hold_action(env))
        assert obs["shouldercamera0_image"].shape == (3, 84, 84)
        raw = env.raw_obs()
        assert raw["shouldercamera0_image"].shape == (84, 84, 3) and raw["shouldercamera0_image"].dtype == np.uint8
    finally:
        env.close()


def _hold_action(env):
    from shortcut_policy.datasets.robomimic import matrix_to_rot6d

    act = []
    for r in env.env.robots:
        sid = env.env.sim.model.site_name2id(r.part_controllers["right"].ref_name)
        act.append(
            np.concatenate(
                [
                    env.env.sim.data.site_xpos[sid],
                    matrix_to_rot6d(env.env.sim.data.site_xmat[sid].reshape(3, 3)),
                    [-1.0],
                ]
            )
        )
    return np.concatenate(act)


def test_wrapped_make_env_stacks_observations(abs_env):
    pytest.importorskip("shortcut_policy.envs.wrappers")
    from shortcut_policy.envs.wrappers import MultiStepWrapper

    env = MultiStepWrapper(abs_env, n_obs_steps=2, n_action_steps=8, max_episode_steps=700)
    obs, _ = env.reset(seed=100000)
    assert obs["obs"].shape == (2, 59)
    obs, *_ = env.step(np.repeat(_hold_action(abs_env)[None], 8, axis=0))
    assert obs["obs"].shape == (2, 59)


@pytest.mark.slow
def test_lite_physics_is_bit_identical():
    """robosuite's lite_physics=True only drops redundant mj_forward calls: same trajectory, faster."""
    from shortcut_policy.envs.experts.transport import TransportExpert

    trajs = []
    for lite in (False, True):
        env = T.TransportEnv(obs_keys=["obs"], enable_render=False, lite_physics=lite)
        try:
            assert env.env.lite_physics is lite
            env.reset(seed=100004)
            ex = TransportExpert(0).reset(env)
            trajs.append(np.stack([env.step(ex.act(env))[0]["obs"] for _ in range(200)]))
        finally:
            env.close()
    np.testing.assert_array_equal(trajs[0], trajs[1])
