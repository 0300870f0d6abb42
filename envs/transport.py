"""Robomimic TwoArmTransport (two Pandas, single-arm-opposed) through robosuite 1.5 + MuJoCo 3.

The env is created from a robomimic-style ``env_meta`` dict (``env_name``, ``type``, ``env_kwargs``), i.e. the
JSON stored as ``data.attrs["env_args"]`` in a robomimic hdf5. Data recorded with robosuite <= 1.4 (all official
robomimic / Diffusion Policy files) store a flat arm controller config (``{"type": "OSC_POSE", ...}``); robosuite
1.5 needs a composite config, so such a config is converted with robosuite's own
``refactor_composite_controller_config`` and, to keep the old semantics, the arm controller gets
``input_ref_frame="world"`` (robosuite <= 1.4 interpreted deltas / absolute goals in the world frame) and the env
``lite_physics=False``. ``control_delta`` (old key) maps to ``input_type`` ("delta" / "absolute").

Observations are dicts (gymnasium ``spaces.Dict``):

* ``obs`` (59,): concat of ``LOWDIM_CONCAT_KEYS`` (Diffusion Policy's transport_lowdim order), when requested;
* any robomimic key: ``object`` (41), ``robot{0,1}_eef_pos`` (3), ``robot{0,1}_eef_quat`` (4, xyzw, hand body),
  ``robot{0,1}_gripper_qpos`` (2), float32;
* camera keys ``<camera>_image`` as float32 (3, H, W) in [0, 1], upright (robomimic flips robosuite's OpenGL
  images the same way before storing them).

Actions: delta (14) = 2 x [dpos 3, drot axis-angle 3, gripper 1] in [-1, 1]; absolute (20) = 2 x [pos 3, rot6d 6,
gripper 1] (world frame, Diffusion Policy's ``abs_action``), converted to axis-angle for robosuite's absolute OSC.

Episodes never terminate (robomimic sets ``ignore_done``) unless ``terminate_on_success`` (then at the first
success: the score is the max reward either way); ``truncated`` is set after ``max_episode_steps``
(700). ``reward`` is the env's sparse reward, ``info["success"]`` its ``_check_success()``. With ``track_stages``
(on in ``make_env`` for evaluation, off for demos and the real-time robot) ``info["stages"]`` maps each sub-goal
reached so far (``task_stages()``: lid off, trash binned, hammer handed over, ...) to its first step.
Seeding follows Diffusion Policy: ``np.random.seed(seed)`` right before robosuite's ``reset()``; robosuite's
placement samplers, robot init noise and the hammer's size all draw from numpy's global RNG.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from shortcut_policy.datasets.robomimic import read_env_meta, rot6d_to_axis_angle
from shortcut_policy.envs.wrappers import wrap_env
from shortcut_policy.utils import to_plain as _as_plain

ENV_NAME = "TwoArmTransport"
ROBOSUITE_ENV_TYPE = 1  # robomimic EnvType.ROBOSUITE_TYPE
MAX_STEPS = 700
# the task stages TransportEnv.task_stages() reports (info["stages"] with track_stages), roughly in task order
TASK_STAGES = (
    "lid_grasped",
    "lid_off",
    "trash_grasped",
    "trash_in_trash_bin",
    "hammer_grasped_robot0",
    "hammer_grasped_robot1",
    "hammer_in_target_bin",
    "success",
)
CONTROL_HZ = 20
LOWDIM_CONCAT_KEYS: tuple[str, ...] = (
    "object",
    "robot0_eef_pos",
    "robot0_eef_quat",
    "robot0_gripper_qpos",
    "robot1_eef_pos",
    "robot1_eef_quat",
    "robot1_gripper_qpos",
)
LOWDIM_SHAPES: dict[str, tuple[int, ...]] = {
    "object": (41,),
    "robot0_eef_pos": (3,),
    "robot0_eef_quat": (4,),
    "robot0_gripper_qpos": (2,),
    "robot1_eef_pos": (3,),
    "robot1_eef_quat": (4,),
    "robot1_gripper_qpos": (2,),
}
OBS_DIM = sum(LOWDIM_SHAPES[k][0] for k in LOWDIM_CONCAT_KEYS)  # 59
CAMERAS: tuple[str, ...] = ("shouldercamera0", "robot0_eye_in_hand", "shouldercamera1", "robot1_eye_in_hand")
IMAGE_KEYS: tuple[str, ...] = tuple(f"{c}_image" for c in CAMERAS)
DELTA_ACTION_DIM = 14
ABS_ACTION_DIM = 20

# The env_args of robomimic's TwoArmTransport datasets (recorded with robosuite <= 1.4, flat OSC_POSE config).
OSC_POSE_OLD: dict[str, Any] = {
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
}
DEFAULT_ENV_META: dict[str, Any] = {
    "env_name": ENV_NAME,
    "type": ROBOSUITE_ENV_TYPE,
    "env_kwargs": {
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": False,
        "control_freq": CONTROL_HZ,
        "controller_configs": OSC_POSE_OLD,
        "robots": ["Panda", "Panda"],
        "env_configuration": "single-arm-opposed",
        "reward_shaping": False,
        "camera_names": list(CAMERAS),
        "camera_heights": 84,
        "camera_widths": 84,
        "camera_depths": False,
        "render_gpu_device_id": 0,
    },
}


def default_env_meta(abs_action: bool = False) -> dict:
    """A copy of the default robomimic env_meta of TwoArmTransport (delta OSC_POSE control, 84 x 84 cameras), with
    absolute-pose control (``control_delta=False``) when ``abs_action``."""
    meta = copy.deepcopy(DEFAULT_ENV_META)
    if abs_action:
        meta["env_kwargs"]["controller_configs"]["control_delta"] = False
    return meta


def _is_old_part_config(cfg: Mapping) -> bool:
    """A robosuite <= 1.4 controller config: a single part controller (has "type" like OSC_POSE, no body_parts)."""
    return (
        isinstance(cfg, Mapping)
        and "body_parts" not in cfg
        and str(cfg.get("type", "")).upper()
        not in (
            "BASIC",
            "HYBRID_MOBILE_BASE",
            "WHOLE_BODY_IK",
            "WHOLE_BODY_MINK_IK",
        )
    )


def convert_env_meta(env_meta: Mapping, source: str = "env_meta") -> tuple[dict, dict]:
    """Validate a robomimic env_meta and return (robosuite.make kwargs, info about the conversion).

    ``source`` names where the meta came from (a file path) for error messages.
    """
    env_meta = _as_plain(env_meta)
    if isinstance(env_meta, str):
        env_meta = json.loads(env_meta)
    if not isinstance(env_meta, dict):
        raise TypeError(f"{source}: env_meta must be a dict, got {type(env_meta).__name__}")
    for key in ("env_name", "env_kwargs"):
        if key not in env_meta:
            raise KeyError(f"{source}: env_meta has no key {key!r} (keys: {sorted(env_meta)})")
    if env_meta["env_name"] != ENV_NAME:
        raise ValueError(f"{source}: env_meta['env_name']={env_meta['env_name']!r}, expected {ENV_NAME!r}")
    if env_meta.get("type", ROBOSUITE_ENV_TYPE) != ROBOSUITE_ENV_TYPE:
        raise ValueError(
            f"{source}: env_meta['type']={env_meta.get('type')!r}, expected {ROBOSUITE_ENV_TYPE} (robosuite)"
        )
    kw = dict(env_meta["env_kwargs"])
    ctrl = kw.pop("controller_configs", None)
    if ctrl is None:
        raise KeyError(f"{source}: env_meta['env_kwargs'] has no 'controller_configs'")
    info: dict[str, Any] = {"old_format": False}
    robots = kw.get("robots", ["Panda", "Panda"])
    robot_type = robots[0] if isinstance(robots, (list, tuple)) else robots
    if _is_old_part_config(ctrl):
        # lazy: robosuite (optional, the `sim` extra) loads only when a Transport env is built
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )

        if str(ctrl.get("type", "")).upper() != "OSC_POSE":
            raise ValueError(
                f"{source}: controller_configs type={ctrl.get('type')!r} is not supported (expected OSC_POSE)"
            )
        part = dict(ctrl)
        delta = bool(part.pop("control_delta", True))
        part.setdefault("input_type", "delta" if delta else "absolute")
        part["input_ref_frame"] = "world"  # robosuite <= 1.4 semantics
        if "damping" in part and "damping_ratio" not in part:
            part["damping_ratio"] = part.pop("damping")
        if "damping_limits" in part and "damping_ratio_limits" not in part:
            part["damping_ratio_limits"] = part.pop("damping_limits")
        ctrl = refactor_composite_controller_config(part, robot_type, ["right"])
        kw.setdefault("lite_physics", False)
        info["old_format"] = True
    kw["controller_configs"] = ctrl
    info["input_type"] = _arm_config(ctrl).get("input_type", "delta")
    # robomimic-only / renderer keys robosuite.make does not take
    for k in ("camera_depths",):
        kw.setdefault(k, False)
    return kw, info


def _arm_config(ctrl: Mapping) -> dict:
    """The right-arm part config of a robosuite 1.5 composite controller config ({} when absent)."""
    bp = ctrl.get("body_parts", {})
    if "right" in bp:
        return bp["right"]
    if "arms" in bp and "right" in bp["arms"]:
        return bp["arms"]["right"]
    return {}


class TransportEnv(gym.Env):
    """gymnasium-API wrapper around robosuite's TwoArmTransport (see module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        env_meta: Mapping | str | None = None,
        obs_keys: Sequence[str] = ("obs",),
        abs_action: bool | None = None,
        max_episode_steps: int = MAX_STEPS,
        render_camera: str = "agentview",
        render_size: tuple[int, int] = (128, 128),
        enable_render: bool = True,
        image_size: int | None = None,
        hard_reset: bool | None = None,
        lite_physics: bool | None = None,
        terminate_on_success: bool = False,
        track_stages: bool = False,
        source: str = "env_meta",
    ):
        os.environ.setdefault("MUJOCO_GL", "egl")
        if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
            os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        import robosuite  # lazy: robosuite + mujoco (optional, the `sim` extra), after MUJOCO_GL is chosen

        env_meta = default_env_meta(bool(abs_action)) if env_meta is None else _as_plain(env_meta)
        if isinstance(env_meta, str):
            env_meta = json.loads(env_meta)
        if abs_action is not None:
            ck = env_meta["env_kwargs"].get("controller_configs", {})
            if _is_old_part_config(ck):
                ck["control_delta"] = not abs_action
            else:
                _arm_config(ck)["input_type"] = "absolute" if abs_action else "delta"
        self.env_meta = env_meta
        kw, info = convert_env_meta(env_meta, source=source)
        self.abs_action = info["input_type"] == "absolute"
        self.obs_keys = tuple(obs_keys)
        unknown = [k for k in self.obs_keys if k != "obs" and k not in LOWDIM_SHAPES and not k.endswith("_image")]
        if unknown:
            raise KeyError(
                f"{source}: unknown observation key(s) {unknown}; known: obs, {sorted(LOWDIM_SHAPES)}, "
                f"<camera>_image for cameras {list(CAMERAS)}"
            )
        self.image_keys = tuple(k for k in self.obs_keys if k.endswith("_image"))
        cams = [k[: -len("_image")] for k in self.image_keys]
        need_object = "obs" in self.obs_keys or "object" in self.obs_keys
        kw["use_object_obs"] = need_object
        kw["use_camera_obs"] = bool(cams)
        if cams:
            kw["camera_names"] = cams
            if image_size is not None:
                kw["camera_heights"] = kw["camera_widths"] = int(image_size)
        kw["has_offscreen_renderer"] = bool(cams) or enable_render
        kw["has_renderer"] = False
        kw["ignore_done"] = True
        if hard_reset is not None:
            kw["hard_reset"] = hard_reset
        if lite_physics is not None:  # measured bit-identical to lite_physics=False here, 1.5x faster
            kw["lite_physics"] = bool(lite_physics)
        kw.pop("camera_depths", None) if not cams else None
        self._make_kwargs = kw
        self.env = robosuite.make(ENV_NAME, **kw)
        self.render_camera = render_camera
        self.render_size = tuple(render_size)
        self.enable_render = enable_render
        self.max_episode_steps = int(max_episode_steps)
        self.terminate_on_success = bool(terminate_on_success)
        self.track_stages = bool(track_stages)  # info["stages"]: ~5 ms per step (contact scans), so evaluation only
        self._step = 0
        self._stages: dict[str, int] = {}
        self._last_raw = None

        h = int(kw.get("camera_heights", 84))
        w = int(kw.get("camera_widths", 84))
        space = {}
        for k in self.obs_keys:
            if k == "obs":
                space[k] = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
            elif k.endswith("_image"):
                space[k] = spaces.Box(0.0, 1.0, (3, h, w), np.float32)
            else:
                space[k] = spaces.Box(-np.inf, np.inf, LOWDIM_SHAPES[k], np.float32)
        self.observation_space = spaces.Dict(space)
        adim = ABS_ACTION_DIM if self.abs_action else DELTA_ACTION_DIM
        lo = -np.inf if self.abs_action else -1.0
        self.action_space = spaces.Box(lo, -lo, (adim,), np.float32)
        self.action_dim = adim
        self.render_mode = "rgb_array"

    # ------------------------------------------------------------------ observations
    @staticmethod
    def _raw_key(k: str) -> str:
        """The robosuite observation key of an observation name ("object" is "object-state")."""
        return "object-state" if k == "object" else k

    def _convert_obs(self, raw: Mapping) -> dict:
        """The requested observations from a raw robosuite dict: "obs" (59,) float32, low-dim keys in
        ``LOWDIM_SHAPES``, camera images (3, H, W) float32 in [0, 1] flipped upright."""
        out = {}
        for k in self.obs_keys:
            if k == "obs":
                out[k] = np.concatenate(
                    [np.asarray(raw[self._raw_key(c)], np.float32).reshape(-1) for c in LOWDIM_CONCAT_KEYS]
                )
            elif k.endswith("_image"):
                img = np.asarray(raw[k])[::-1]  # robosuite renders OpenGL-style (bottom-up); robomimic flips
                out[k] = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0
            else:
                out[k] = np.asarray(raw[self._raw_key(k)], np.float32).reshape(LOWDIM_SHAPES[k])
        return out

    def raw_obs(self) -> dict:
        """The last robosuite observation dict (robosuite key names, images as stored: HWC uint8, upright)."""
        raw = dict(self._last_raw)
        for k in list(raw):
            if k.endswith("_image"):
                raw[k] = np.ascontiguousarray(raw[k][::-1])
        return raw

    # ------------------------------------------------------------------ gym API
    def reset(self, seed: int | None = None, options: dict | None = None):
        """Reset robosuite after ``np.random.seed(seed)`` (Diffusion Policy's seeding; robosuite draws object placement
        and robot noise from NumPy's global RNG); ``options["state"]`` then restores a flattened MuJoCo state. Returns
        (observation, info with ``success`` and, with ``track_stages``, ``stages``)."""
        options = options or {}
        if seed is not None:
            np.random.seed(int(seed))  # Diffusion Policy / robomimic seeding
        raw = self.env.reset()
        if "state" in options:
            raw = self.reset_to(options["state"])
        self._last_raw = raw
        self._step = 0
        self._stages = {}
        info = {"success": bool(self.env._check_success())}
        if self.track_stages:
            self._update_stages()
            info["stages"] = dict(self._stages)
        return self._convert_obs(raw), info

    def reset_to(self, state) -> dict:
        """Set the flattened MuJoCo state (robomimic ``states`` row) and return the raw obs."""
        state = np.asarray(state, dtype=np.float64)
        self.env.sim.set_state_from_flattened(state)
        self.env.sim.forward()
        for robot in self.env.robots:
            robot.composite_controller.reset()  # goals = current pose
        raw = self.env._get_observations(force_update=True)
        self._last_raw = raw
        return raw

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (float64; the robomimic ``states`` row)."""
        return np.asarray(self.env.sim.get_state().flatten(), dtype=np.float64)

    def to_env_action(self, action) -> np.ndarray:
        """A policy action as robosuite's: delta actions (14,) pass through; absolute actions (20,) = 2 x [pos 3
        (m, world), rot6d 6, gripper 1] become 2 x [pos, axis-angle (rad), gripper] (14,). Raises ``ValueError`` for a
        wrong size."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.action_dim:
            raise ValueError(
                f"TwoArmTransport ({'absolute' if self.abs_action else 'delta'} actions): action has "
                f"{a.shape[0]} dims, expected {self.action_dim}"
            )
        if not self.abs_action:
            return a
        a = a.reshape(2, 10)
        rot = rot6d_to_axis_angle(a[:, 3:9])
        return np.concatenate([a[:, :3], rot, a[:, 9:10]], axis=1).reshape(-1)

    def step(self, action):
        """Apply one action (20 Hz control); returns (obs, sparse reward, terminated, truncated, info with ``success``,
        ``step`` and, with ``track_stages``, ``stages``). Terminates at the first success only with
        ``terminate_on_success``; truncates after ``max_episode_steps``."""
        env_action = self.to_env_action(action)
        raw, reward, _done, _info = self.env.step(env_action)
        self._last_raw = raw
        self._step += 1
        success = bool(self.env._check_success())
        truncated = self._step >= self.max_episode_steps
        info = {"success": success, "step": self._step}
        if self.track_stages:
            self._update_stages()
            info["stages"] = dict(self._stages)
        # terminate_on_success (evaluation speed): the score is the episode's max reward, so ending at the first
        # success changes no result; robomimic's own env (ignore_done) runs on to the step limit
        terminated = success and self.terminate_on_success
        return self._convert_obs(raw), float(reward), terminated, truncated and not terminated, info

    def render(self, camera: str | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        """RGB frame (H, W, 3) uint8 from an offscreen MuJoCo render (for videos)."""
        if not self.enable_render and not self.image_keys:
            raise RuntimeError("TransportEnv was created with enable_render=False and no cameras")
        h, w = size or self.render_size
        img = self.env.sim.render(camera_name=camera or self.render_camera, height=int(h), width=int(w))
        return np.ascontiguousarray(img[::-1])

    def task_stages(self) -> dict[str, bool]:
        """The task's sub-goals in the current state, from privileged simulator state (for diagnosing policies;
        never an observation). ``hammer_grasped_robot1`` is the hand-over (the hammer starts on robot0's side).
        Keys: :data:`TASK_STAGES` (the registry entry's ``stages``)."""
        rs, tr = self.env, self.env.transport

        def grasped(i, geoms):
            return bool(rs._check_grasp(gripper=rs.robots[i].gripper["right"], object_geoms=geoms))

        return {
            "lid_grasped": grasped(0, tr.lid.handle_geoms) or grasped(1, tr.lid.handle_geoms),
            "lid_off": not self.lid_on_start_bin(),
            "trash_grasped": grasped(0, tr.trash) or grasped(1, tr.trash),
            "trash_in_trash_bin": bool(tr.trash_in_trash_bin),
            "hammer_grasped_robot0": grasped(0, tr.payload.handle_geoms),
            "hammer_grasped_robot1": grasped(1, tr.payload.handle_geoms),
            "hammer_in_target_bin": bool(tr.payload_in_target_bin),
            "success": bool(rs._check_success()),
        }

    def lid_on_start_bin(self) -> bool:
        """The lid's handle is within 0.2 m (xy) of the start bin's centre and above 0.9 m: the lid is still on."""
        sim, tr = self.env.sim, self.env.transport
        hp = np.asarray(sim.data.geom_xpos[tr.lid_handle_geom_ids[0]])
        bp = np.asarray(sim.data.body_xpos[sim.model.body_name2id(tr.objects["start_bin"].root_body)])
        return bool(np.linalg.norm(hp[:2] - bp[:2]) < 0.2 and hp[2] > 0.9)

    def _update_stages(self) -> None:
        """Remember the first step at which each stage was reached (``info["stages"]``: name -> step)."""
        for k, v in self.task_stages().items():
            if v and k not in self._stages:
                self._stages[k] = self._step

    def is_success(self) -> bool:
        """Whether robosuite's ``_check_success()`` holds now (the hammer is in the target bin and the trash binned)."""
        return bool(self.env._check_success())

    def close(self):
        """Close robosuite's env (errors of an offscreen context at exit are ignored)."""
        try:
            self.env.close()
        except Exception:  # pragma: no cover - robosuite close on an offscreen ctx can fail at exit
            pass


def env_meta_from_task_cfg(task_cfg) -> dict | None:
    """env_meta from a task config: ``env_meta_path`` (a robomimic hdf5), else the training hdf5
    (``dataset.hdf5_path``), else the inline ``env_meta``."""
    path = task_cfg.get("env_meta_path", None) if hasattr(task_cfg, "get") else None
    if not path and hasattr(task_cfg, "get"):  # trained from a robomimic hdf5: its env_args define the env (as DP)
        path = (task_cfg.get("dataset", None) or {}).get("hdf5_path", None)
    if path:
        return read_env_meta(path)
    meta = task_cfg.get("env_meta", None) if hasattr(task_cfg, "get") else None
    return _as_plain(meta) if meta is not None else None


def build_env(task_cfg, render: bool = True, **overrides) -> "TransportEnv":
    """The bare env for a task config (configs/task/transport_*.yaml): the registry's ``make``. Observation keys
    are the config's ``obs_keys``; ``abs_action`` picks absolute (20) or delta (14) actions; ``env_meta`` (inline)
    or ``env_meta_path`` (a robomimic hdf5) describe the env; ``track_stages`` (default on) reports
    ``info["stages"]``."""
    get = task_cfg.get if hasattr(task_cfg, "get") else (lambda k, d=None: getattr(task_cfg, k, d))
    if get("env", "transport") != "transport":
        raise ValueError(f"task env {get('env')!r} is not transport: use the env's own make_env")
    obs_keys = list((get("obs_shapes", None) or get("obs_keys", None) or {"obs": [OBS_DIM]}).keys())
    max_steps = int(get("max_steps", MAX_STEPS))
    kwargs = dict(
        env_meta=env_meta_from_task_cfg(task_cfg),
        obs_keys=obs_keys,
        abs_action=bool(get("abs_action", False)),
        max_episode_steps=max_steps,
        enable_render=render,
        source=f"task config {get('name', 'transport')}",
    )
    if get("render_size", None) is not None:
        kwargs["render_size"] = tuple(get("render_size"))
    if get("render_camera", None):
        kwargs["render_camera"] = get("render_camera")
    if get("hard_reset", None) is not None:
        kwargs["hard_reset"] = bool(get("hard_reset"))
    if get("lite_physics", None) is not None:
        kwargs["lite_physics"] = bool(get("lite_physics"))
    if get("terminate_on_success", None) is not None:
        kwargs["terminate_on_success"] = bool(get("terminate_on_success"))
    # evaluation reports stages by default, also for checkpoints whose saved task config predates the key
    kwargs["track_stages"] = bool(get("track_stages", True))
    kwargs.update(overrides)
    return TransportEnv(**kwargs)


def make_env(task_cfg, wrap: bool = True, render: bool = True, **overrides):
    """:func:`build_env`, wrapped for chunked policies when ``wrap`` (:func:`shortcut_policy.envs.wrappers.wrap_env`:
    ``MultiStepWrapper(VideoRecorder(env), n_obs_steps, n_action_steps, max_steps)``)."""
    env = build_env(task_cfg, render=render, **overrides)
    return wrap_env(env, task_cfg, max_steps=MAX_STEPS) if wrap else env
