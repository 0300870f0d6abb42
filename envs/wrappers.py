"""Generic gymnasium wrappers for chunked (receding-horizon) policies, as in Diffusion Policy.

``MultiStepWrapper`` follows Diffusion Policy's ``diffusion_policy/gym_util/multistep_wrapper.py`` semantics on the
gymnasium 5-tuple API:

* observations are dicts; each key is stacked over the last ``n_obs_steps`` steps -> (To, ...); after
  ``reset`` (and whenever fewer than To observations exist) the oldest available one is repeated in front;
* ``step(actions)`` takes a chunk (Ta, Da) (or (Da,) for a single action) and executes it action by action,
  stopping early as soon as the episode terminates or is truncated (inner ``truncated`` or
  ``max_episode_steps`` inner steps);
* the returned reward is the aggregate (default: max, DP's 'max') of all inner rewards of the episode so far;
  ``terminated`` is True once any inner step terminated; ``truncated`` once the step budget is used up
  without termination;
* ``info`` holds, per key, the values of the last To inner steps (lists), plus ``n_inner_steps`` (the number
  of inner env steps executed in the episode), ``executed`` (actions executed by this call) and
  ``max_reward``.

Environment-agnostic: every registered env (Push-T, Transport, ...) is wrapped by :func:`wrap_env`, the one place
that builds ``MultiStepWrapper(VideoRecorder(env), To, Ta, max_steps)`` from a task config.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
from gymnasium import spaces

from shortcut_policy.utils import cfg_get, check_int


def _stack_space(space: spaces.Space, n: int) -> spaces.Space:
    """The observation space of To stacked steps: each Box (...) becomes (n, ...) (Dict spaces key by key). Raises
    ``TypeError`` for other spaces."""
    if isinstance(space, spaces.Dict):
        return spaces.Dict({k: _stack_space(v, n) for k, v in space.spaces.items()})
    if isinstance(space, spaces.Box):
        low = np.repeat(space.low[None], n, axis=0)
        high = np.repeat(space.high[None], n, axis=0)
        return spaces.Box(low=low, high=high, dtype=space.dtype)
    raise TypeError(f"MultiStepWrapper: unsupported observation space {space!r} (expected Box or Dict of Box)")


def _repeat_action_space(space: spaces.Space, n: int) -> spaces.Space:
    """The action space of an n-action chunk: a Box (Da,) becomes (n, Da). Raises ``TypeError`` for other spaces."""
    if isinstance(space, spaces.Box):
        return spaces.Box(
            low=np.repeat(space.low[None], n, 0), high=np.repeat(space.high[None], n, 0), dtype=space.dtype
        )
    raise TypeError(f"MultiStepWrapper: unsupported action space {space!r} (expected Box)")


class MultiStepWrapper(gym.Wrapper):
    """Receding-horizon wrapper (see the module docstring): stacks the last ``n_obs_steps`` observations, executes
    chunks of up to ``n_action_steps`` actions, truncates after ``max_episode_steps`` inner steps and aggregates
    rewards with ``reward_agg`` ("max", "sum", "mean" or "last"). Raises ``ValueError`` for non-positive step
    counts or an unknown aggregation."""

    def __init__(
        self,
        env: gym.Env,
        n_obs_steps: int,
        n_action_steps: int,
        max_episode_steps: int | None = None,
        reward_agg: str = "max",
    ):
        super().__init__(env)
        for name, v in (("n_obs_steps", n_obs_steps), ("n_action_steps", n_action_steps)):
            if isinstance(v, bool) or not float(v).is_integer() or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive integer")
        if max_episode_steps is not None and (not float(max_episode_steps).is_integer() or max_episode_steps < 1):
            raise ValueError(f"max_episode_steps={max_episode_steps!r}: expected a positive integer or None")
        if reward_agg not in ("max", "sum", "mean", "last"):
            raise ValueError(f"reward_agg={reward_agg!r}: expected one of max|sum|mean|last")
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.reward_agg = reward_agg
        self.observation_space = _stack_space(env.observation_space, self.n_obs_steps)
        self.action_space = _repeat_action_space(env.action_space, self.n_action_steps)
        self._obs = deque(maxlen=self.n_obs_steps)
        self._rewards: list[float] = []
        self._infos = deque(maxlen=self.n_obs_steps)
        self._terminated = False
        self._truncated = False

    # -- helpers ------------------------------------------------------------------------------------------
    def _stacked_obs(self) -> dict:
        """The last To observations stacked on a new first axis ({key: (To, ...)}), the oldest repeated in front when
        fewer exist."""
        obs = list(self._obs)
        first = obs[0]
        while len(obs) < self.n_obs_steps:
            obs.insert(0, first)
        if isinstance(first, dict):
            return {k: np.stack([o[k] for o in obs], axis=0) for k in first}
        return np.stack(obs, axis=0)

    def _agg_reward(self) -> float:
        """The episode's inner rewards so far aggregated with ``reward_agg`` (0.0 before the first step)."""
        if not self._rewards:
            return 0.0
        r = np.asarray(self._rewards, dtype=np.float64)
        return float({"max": r.max, "sum": r.sum, "mean": r.mean}.get(self.reward_agg, lambda: r[-1])())

    def _info(self, executed: int) -> dict:
        """Infos of the last To inner steps as {key: [values]} plus ``n_inner_steps``, ``executed`` (this call) and
        ``max_reward``."""
        out: dict = {}
        for info in self._infos:
            for k, v in info.items():
                out.setdefault(k, []).append(v)
        out["n_inner_steps"] = len(self._rewards)
        out["executed"] = executed
        out["max_reward"] = max(self._rewards) if self._rewards else 0.0
        return out

    @property
    def done(self) -> bool:
        return self._terminated or self._truncated

    @property
    def n_inner_steps(self) -> int:
        return len(self._rewards)

    @property
    def rewards(self) -> list[float]:
        return list(self._rewards)

    # -- gym API ------------------------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        """Reset the inner env (``seed``, ``options``) and the history; returns (stacked observation, info)."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs.clear()
        self._infos.clear()
        self._obs.append(obs)
        self._infos.append(info)
        self._rewards = []
        self._terminated = False
        self._truncated = False
        return self._stacked_obs(), self._info(0)

    def step(self, action):
        """Execute an action chunk (Ta, Da) (or one action (Da,)) until it ends or the episode does; returns (stacked
        observation, aggregated reward, terminated, truncated, info). Raises ``ValueError`` for another shape."""
        action = np.asarray(action)
        if action.ndim == 1:
            action = action[None]
        if action.ndim != 2:
            raise ValueError(f"MultiStepWrapper.step: expected an action chunk (Ta, Da), got shape {action.shape}")
        executed = 0
        for act in action:
            if self._terminated or self._truncated:
                break
            obs, reward, terminated, truncated, info = self.env.step(act)
            executed += 1
            self._obs.append(obs)
            self._infos.append(info)
            self._rewards.append(float(reward))
            self._terminated = self._terminated or bool(terminated)
            if self.max_episode_steps is not None and len(self._rewards) >= self.max_episode_steps:
                truncated = True
            self._truncated = (self._truncated or bool(truncated)) and not self._terminated
        return self._stacked_obs(), self._agg_reward(), self._terminated, self._truncated, self._info(executed)


class VideoRecorder(gym.Wrapper):
    """Keeps ``env.render()`` frames of the current episode (after reset and after each inner step) while
    ``enabled``; ``frames`` returns them; :func:`write_video` saves them. Put it *inside* MultiStepWrapper."""

    def __init__(self, env: gym.Env, enabled: bool = True, every: int = 1):
        super().__init__(env)
        self.enabled = bool(enabled)
        self.every = max(1, int(every))
        self._frames: list[np.ndarray] = []
        self._count = 0

    @property
    def frames(self) -> list[np.ndarray]:
        return list(self._frames)

    def reset(self, **kwargs):
        """Reset the inner env and start a new frame list (with the first frame when enabled)."""
        out = self.env.reset(**kwargs)
        self._frames = []
        self._count = 0
        if self.enabled:
            self._frames.append(np.asarray(self.env.render()))
        return out

    def step(self, action):
        """Step the inner env, keeping a frame every ``every`` steps when enabled."""
        out = self.env.step(action)
        self._count += 1
        if self.enabled and self._count % self.every == 0:
            self._frames.append(np.asarray(self.env.render()))
        return out


def write_video(frames, path, fps: int = 10) -> str:
    """Write uint8 frames to an MP4 (imageio-ffmpeg) or, if that fails or ``path`` ends in .gif, a GIF.
    Returns the path written."""
    path = Path(path)
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    if not frames:
        raise ValueError("write_video: no frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".gif":
        try:
            imageio.mimwrite(str(path), frames, fps=fps, macro_block_size=1)
            return str(path)
        except Exception:  # no ffmpeg: fall back to GIF
            path = path.with_suffix(".gif")
    imageio.mimwrite(str(path), frames, duration=1.0 / fps, loop=0)
    return str(path)


def wrap_env(env: gym.Env, task_cfg, video: bool = False, max_steps: int = 300) -> MultiStepWrapper:
    """``MultiStepWrapper(VideoRecorder(env, enabled=video), n_obs_steps, n_action_steps, max_steps)`` with the
    task config's ``n_obs_steps`` (default 2), ``n_action_steps`` (8) and ``max_steps`` (default ``max_steps``):
    how the rollout runner, the trainer's rollout evaluation and the env modules' ``make_env(wrap=True)`` wrap a
    bare env."""
    env = VideoRecorder(env, enabled=video)
    return MultiStepWrapper(
        env,
        n_obs_steps=check_int("task.n_obs_steps", cfg_get(task_cfg, "n_obs_steps", 2), 1),
        n_action_steps=check_int("task.n_action_steps", cfg_get(task_cfg, "n_action_steps", 8), 1),
        max_episode_steps=check_int("task.max_steps", cfg_get(task_cfg, "max_steps", max_steps), 1),
    )
