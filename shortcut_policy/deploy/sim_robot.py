"""A simulated robot that runs in real time behind the Robot protocol.

The simulation advances on the wall clock: tick j covers [t0 + j dt, t0 + (j+1) dt] and is integrated (one env step)
as soon as the wall clock has passed its end, so an observation stamped t is never visible before t. The command
applied during a tick is a zero-order hold: the latest action with ``t_exec <= tick start`` that had arrived by
``tick start + latch`` (a command arriving later than that takes effect at the following tick). Before the first
command the robot stands still (no env step). Observations are stamped with their tick time (time.perf_counter)
and the last ``n_obs_steps`` are kept (the oldest repeated at the start, as Diffusion Policy's wrapper).

Episodes (``auto_reset``): when an episode ends the env is reset within the same tick, so the observation stamped
with that tick's end is the new episode's first frame. Every frame carries its episode id (observation key
"episode", robot.EPISODE_KEY; 0 after ``start``, +1 per reset) and the window restarts at a reset: the new first
frame repeated ``n_obs_steps`` times, as at start. Commands sent with ``episode=e`` (as the control loop does) are
bound to episode e: queued or held ones are forgotten at the reset (the robot stands still until a command of the
new episode arrives) and one arriving later is dropped (counted in ``n_reset_dropped_commands``). A command sent
without ``episode`` is a plain standing target: it is held across a reset, as before episodes were tracked.

Any gymnasium env with dict observations of Box spaces works (every registered env: Push-T, Transport, ...;
:func:`make_sim_robot` builds one from a robot config through the env registry); physics catch-up happens in the
caller's thread inside get_observation()/send_action()/poll(), so no extra thread competes with inference.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from shortcut_policy.conventions import N_OBS_STEPS
from shortcut_policy.envs.registry import get_env_spec, make_env, registered_envs, resolve

from .robot import EPISODE_KEY, TIMESTAMP_KEY


class SimRobot:
    """A gymnasium env run as a real-time robot on the wall clock (see the module docstring): observations, command
    latching and episode resets behave as they would on hardware, so the control loop can be tested off-line."""

    def __init__(
        self,
        env,
        control_hz: float,
        n_obs_steps: int = N_OBS_STEPS,
        latch_s: float | None = None,
        clock=time.perf_counter,
        name: str = "sim",
        auto_reset: bool = False,
    ):
        """``env``: a gymnasium env with dict observations of Box spaces; ``control_hz`` (Hz, > 0): tick rate;
        ``n_obs_steps`` (>= 1): frames per observation window; ``latch_s`` (seconds, default a quarter period): how
        late after a tick's start a command may arrive and still apply to that tick; ``clock``: seconds (default
        time.perf_counter). ``auto_reset``: when an episode ends the env is reset at once (next seed) and the robot
        keeps running, like a cell whose operator resets the scene; finished episodes are listed in
        ``info()["episodes"]`` and the episode id advances (see the module docstring). Raises ValueError for
        control_hz <= 0 or n_obs_steps < 1."""
        if control_hz <= 0:
            raise ValueError(f"control_hz={control_hz}: expected > 0")
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps={n_obs_steps}: expected >= 1")
        self.env, self.name = env, name
        self.control_hz = float(control_hz)
        self.dt = 1.0 / self.control_hz
        self.latch_s = 0.25 * self.dt if latch_s is None else float(latch_s)
        self.n_obs_steps = int(n_obs_steps)
        self.clock = clock
        space = env.observation_space
        self.obs_shapes = {k: tuple(int(v) for v in s.shape) for k, s in space.spaces.items()}
        self.action_dim = int(np.prod(env.action_space.shape))
        self._hist: deque = deque(maxlen=self.n_obs_steps)
        self._cmds: list[tuple[float, float, np.ndarray, int | None]] = []  # (t_exec, t_received, action, episode)
        self._current = None  # the held command
        self._current_episode = None  # the episode it was sent for (None: untagged, held across resets)
        self.t0 = None
        self.ticks = 0
        self.n_env_steps = 0
        self.n_commands = 0
        self.n_late_commands = 0
        self.rewards: list[float] = []
        self._terminated = self._truncated = False
        self._last_info: dict = {}
        self.closed = False
        self.auto_reset = bool(auto_reset)
        self.episodes: list[dict] = []  # finished episodes (auto_reset): seed, max_reward, success, env_steps
        self._seed = None
        self._ep_start_step = 0  # index into self.rewards where the current episode began
        self.episode = 0  # id of the current episode (0 after start, +1 per auto_reset)
        self.n_reset_dropped_commands = 0  # commands bound to an episode that had ended when they arrived

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self, seed: int | None = None) -> float:
        """Reset the env (``seed``), stand still, start the clock: returns t0 (seconds, ``clock`` time) of tick 0.
        The episode id restarts at 0. Raises RuntimeError after close()."""
        if self.closed:
            raise RuntimeError(f"{self.name}: start() after close()")
        obs, info = self.env.reset(seed=seed)
        self._last_info = info
        self._seed, self._ep_start_step, self.episodes = seed, 0, []
        self.t0 = self.clock()
        self.ticks = 0
        self.n_env_steps = 0
        self.rewards = []
        self._terminated = self._truncated = False
        self._cmds, self._current, self._current_episode = [], None, None
        self.episode, self.n_reset_dropped_commands = 0, 0
        self._hist.clear()
        self._hist.append((self.t0, obs, self.episode))
        return self.t0

    def close(self) -> None:
        """Close the env once (later calls do nothing; errors while closing are ignored)."""
        if not self.closed:
            self.closed = True
            try:
                self.env.close()
            except Exception:  # closing must never mask the error that made us close
                pass

    @property
    def done(self) -> bool:
        return self._terminated or self._truncated

    # -- time ----------------------------------------------------------------------------------------------------
    def _command_for(self, tick_start: float):
        """The zero-order-hold command for the tick starting at ``tick_start``; applied commands are consumed."""
        applicable, keep = [], []
        for c in self._cmds:
            (applicable if max(c[0], c[1] - self.latch_s) <= tick_start + 1e-9 else keep).append(c)
        if applicable:
            _, _, self._current, self._current_episode = max(applicable, key=lambda c: (c[0], c[1]))
        self._cmds = keep
        return self._current

    def poll(self, now: float | None = None) -> int:
        """Integrate every tick whose end has passed by ``now`` (seconds, default ``clock()``); returns the number of
        ticks integrated. Raises RuntimeError before start() or after close()."""
        if self.t0 is None:
            raise RuntimeError(f"{self.name}: call start() first")
        if self.closed:
            raise RuntimeError(f"{self.name}: robot is closed")
        now = self.clock() if now is None else now
        n = 0
        while self.t0 + (self.ticks + 1) * self.dt <= now:
            start = self.t0 + self.ticks * self.dt
            action = self._command_for(start)
            self.ticks += 1
            stamp = self.t0 + self.ticks * self.dt
            if action is not None and not self.done:
                obs, reward, terminated, truncated, info = self.env.step(action)
                self.n_env_steps += 1
                self.rewards.append(float(reward))
                self._terminated |= bool(terminated)
                self._truncated = (self._truncated or bool(truncated)) and not self._terminated
                self._last_info = info
                if self.done and self.auto_reset:
                    obs = self._next_episode()  # restarts the window: this frame is the new episode's first
            else:
                obs = self._hist[-1][1]
            self._hist.append((stamp, obs, self.episode))
            n += 1
        return n

    def _next_episode(self):
        """auto_reset: record the finished episode, reset the env with the next seed, keep the clock running."""
        r = self.rewards[self._ep_start_step :]
        self.episodes.append(
            {
                "seed": self._seed,
                "max_reward": max(r) if r else 0.0,
                "success": bool(self._last_info.get("success", self._terminated)),
                "env_steps": len(r),
            }
        )
        self._seed = None if self._seed is None else int(self._seed) + 1
        obs, info = self.env.reset(seed=self._seed)
        self._last_info = info
        self._terminated = self._truncated = False
        self._ep_start_step = len(self.rewards)
        self.episode += 1
        self._cmds = []  # commands planned in the old episode are not replayed in the new one
        if self._current_episode is not None:  # nor held: the robot stands still until a command for this episode
            self._current, self._current_episode = None, None
        self._hist.clear()  # the window restarts from the new first frame (get_observation repeats it)
        return obs

    # -- protocol ------------------------------------------------------------------------------------------------
    def get_observation(self) -> dict:
        """Catch up on the clock, then the window: {key: (To, ...) float32, "timestamp": (To,) float64 seconds,
        "episode": (To,) int64}, oldest first (frames before the current episode's first are never included)."""
        self.poll()
        hist = list(self._hist)
        while len(hist) < self.n_obs_steps:
            hist.insert(0, hist[0])
        out = {k: np.stack([np.asarray(o[k], dtype=np.float32) for _, o, _ in hist]) for k in self.obs_shapes}
        out[TIMESTAMP_KEY] = np.array([t for t, _, _ in hist], dtype=np.float64)
        out[EPISODE_KEY] = np.array([e for _, _, e in hist], dtype=np.int64)
        return out

    def send_action(self, action, t_exec: float, episode: int | None = None) -> None:
        """Queue ``action`` (action_dim finite numbers) to take effect at ``t_exec`` (seconds, ``clock`` time).
        ``episode``: the episode it was planned in; if that episode has already ended the command is dropped
        (counted in n_reset_dropped_commands), and it is forgotten at the next reset. Raises ValueError for a
        malformed action or an ``episode`` newer than the current one."""
        now = self.clock()
        self.poll(now)
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_dim,) or not np.all(np.isfinite(a)):
            raise ValueError(
                f"{self.name}: action must be {self.action_dim} finite numbers, got {np.asarray(action)!r}"
            )
        if episode is not None:
            episode = int(episode)
            if episode > self.episode:
                raise ValueError(
                    f"{self.name}: action for episode {episode}, but the current episode is {self.episode}"
                )
            if episode < self.episode:  # planned before a reset that happened meanwhile: never executed
                self.n_reset_dropped_commands += 1
                return
        if now - self.latch_s > t_exec:
            self.n_late_commands += 1
        self._cmds.append((float(t_exec), now, a, episode))
        self.n_commands += 1

    def info(self) -> dict:
        """Figures of the current episode (reward, max_reward; success and coverage when the env reports them) plus
        counters: env steps, ticks, late and reset-dropped commands, finished ``episodes`` and the current ``episode``.
        """
        r = self.rewards[self._ep_start_step :]
        out = {
            "reward": r[-1] if r else 0.0,
            "max_reward": max(r) if r else 0.0,
            "n_env_steps": self.n_env_steps,
            "ticks": self.ticks,
            "terminated": self._terminated,
            "truncated": self._truncated,
            "late_commands": self.n_late_commands,
            "episodes": list(self.episodes),
            "episode": self.episode,
            "reset_dropped_commands": self.n_reset_dropped_commands,
        }
        for k in ("success", "coverage"):
            if k in self._last_info:
                out[k] = self._last_info[k]
        return out


def make_sim_robot(
    robot_cfg, n_obs_steps: int, hz: float | None = None, latch_s: float | None = None, auto_reset: bool = False
) -> SimRobot:
    """The simulated robot of a robot config (configs/robot/sim_*.yaml): ``env`` names a registered env (default
    pusht) and the other fields are its task fields. The env registry builds the bare env and names the robot
    class (``EnvSpec.sim_robot``, default :class:`SimRobot`)."""
    cfg = dict(robot_cfg)
    cfg.setdefault("env", "pusht")
    env_name = cfg["env"]
    try:
        spec = get_env_spec(env_name)
    except ValueError:
        raise ValueError(f"robot env {env_name!r}: expected one of {' | '.join(registered_envs())}") from None
    robot_cls = resolve(spec.sim_robot, f"robot env {env_name!r}", spec)
    env = make_env(cfg, wrap=False)
    rate = float(hz or cfg.get("control_hz", 10))
    return robot_cls(
        env,
        rate,
        n_obs_steps=n_obs_steps,
        latch_s=latch_s,
        name=cfg.get("name", f"sim_{env_name}"),
        auto_reset=auto_reset,
    )
