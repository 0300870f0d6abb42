"""The robot protocol the control loop talks to, and the observation-spec checks made before it moves.

A robot exposes
  obs_shapes: {key: per-step shape}, action_dim: int, control_hz: float, n_obs_steps: int
  start(seed) -> t0          reset / home, start its clock; returns the time (time.perf_counter) of tick 0
  get_observation() -> dict  {key: (To, ...) float32} plus "timestamp": (To,) capture times (perf_counter seconds),
                             oldest first; the last entry is the latest observation; optionally "episode" (below)
  send_action(action, t_exec, episode=None)
                             queue one action (Da,) to take effect at time t_exec (perf_counter seconds); a robot
                             that reports "episode" must accept ``episode`` (below)
  info() -> dict             task figures (e.g. reward, max_reward, success) for reporting
  done: bool                 the episode/task ended (terminated or truncated)
  close()                    stop safely; must be idempotent (the loop calls it on every exit path)

Episode resets. A robot whose scene can be reset while the loop runs (an operator resetting the cell, SimRobot's
``auto_reset``) reports it through the observation key "episode" (EPISODE_KEY): a (To,) integer array, aligned with
"timestamp", giving the episode each frame belongs to; ids never decrease, and a new id means the scene was reset
at that frame. The robot should restart its window at a reset (the new first frame repeated, as at start), but the
loop does not rely on it: it never shows the policy a frame older than the latest episode's first frame
(``loop.episode_window``). When the latest frame's id changes, the loop discards its queued actions, the result of
any inference started before the change and the action it holds on a deadline miss, and replans from the new
episode. It passes the episode its actions were planned in to ``send_action(..., episode=e)``; the robot must never
execute (now, later, or as the command it holds) an action whose ``e`` is older than its current episode, since a
reset can land between the loop's last observation and its command; it raises ValueError for an ``e`` newer than
its current episode. A robot without the key is taken to run a single episode, and ``send_action`` is then called
without ``episode``.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

TIMESTAMP_KEY = "timestamp"
EPISODE_KEY = "episode"


class ObservationError(ValueError):
    """An observation (or an observation spec) does not match what the policy expects."""


@runtime_checkable
class Robot(Protocol):
    """The structural type of a robot the control loop drives (attributes and methods as in the module docstring;
    checked with ``isinstance`` thanks to ``runtime_checkable``)."""

    obs_shapes: dict
    action_dim: int
    control_hz: float
    n_obs_steps: int

    def start(self, seed: int | None = None) -> float:
        """Reset / home the robot (``seed`` for a simulated one) and start its clock; returns the time of tick 0
        (time.perf_counter seconds)."""

    def get_observation(self) -> dict:
        """The latest observation window: {key: (To, ...) float32, "timestamp": (To,) seconds[, "episode": (To,)
        int]}."""

    def send_action(self, action, t_exec: float, episode: int | None = None) -> None:
        """Queue one action (Da,) to take effect at ``t_exec`` (seconds), planned in ``episode`` (module docstring)."""

    def info(self) -> dict:
        """Task figures for reporting (e.g. reward, max_reward, success)."""

    @property
    def done(self) -> bool:
        """Whether the episode / task ended (terminated or truncated)."""

    def close(self) -> None:
        """Stop the robot safely; idempotent."""


def _shape(s) -> tuple:
    """A shape as a tuple of ints."""
    return tuple(int(v) for v in s)


def check_spec(
    policy_obs_shapes: Mapping,
    policy_action_dim: int,
    robot_obs_shapes: Mapping,
    robot_action_dim: int,
    policy_name: str = "policy",
    robot_name: str = "robot",
) -> None:
    """Raise ObservationError naming every key whose shape differs, is missing, or an action-dim mismatch."""
    problems = []
    for k, want in policy_obs_shapes.items():
        if k not in robot_obs_shapes:
            problems.append(
                f"observation key {k!r} (shape {_shape(want)}) is not provided by {robot_name} "
                f"(it provides {sorted(robot_obs_shapes)})"
            )
        elif _shape(robot_obs_shapes[k]) != _shape(want):
            problems.append(
                f"observation {k!r}: {policy_name} expects per-step shape {_shape(want)}, "
                f"{robot_name} provides {_shape(robot_obs_shapes[k])}"
            )
    if int(policy_action_dim) != int(robot_action_dim):
        problems.append(
            f"action_dim: {policy_name} outputs {int(policy_action_dim)}, {robot_name} takes {int(robot_action_dim)}"
        )
    if problems:
        raise ObservationError("observation/action spec mismatch: " + "; ".join(problems))


def validate_observation(obs: Mapping, obs_shapes: Mapping, n_obs_steps: int) -> None:
    """Check one robot observation (a dict of (To, ...) arrays plus timestamps, and optional episode ids) before it
    reaches the policy. Raises ObservationError naming the key: not a dict, "timestamp" missing or shorter than
    ``n_obs_steps``, a policy key missing / of the wrong shape / not finite, "episode" (if present) not a
    non-decreasing integer array of the timestamps' shape."""
    if not isinstance(obs, Mapping):
        raise ObservationError(f"observation must be a dict, got {type(obs).__name__}")
    if TIMESTAMP_KEY not in obs:
        raise ObservationError(f"observation key {TIMESTAMP_KEY!r} missing (got {sorted(obs)})")
    ts = np.asarray(obs[TIMESTAMP_KEY])
    if ts.ndim != 1 or ts.shape[0] < n_obs_steps:
        raise ObservationError(
            f"observation {TIMESTAMP_KEY!r} has shape {ts.shape}; expected ({n_obs_steps},) or longer"
        )
    if EPISODE_KEY in obs:
        ep = np.asarray(obs[EPISODE_KEY])
        if ep.shape != ts.shape:
            raise ObservationError(
                f"observation {EPISODE_KEY!r} has shape {ep.shape}; expected {ts.shape} "
                f"(one episode id per {TIMESTAMP_KEY!r} entry)"
            )
        if not (
            np.issubdtype(ep.dtype, np.integer)
            or (np.issubdtype(ep.dtype, np.floating) and np.all(np.isfinite(ep)) and np.all(ep == np.round(ep)))
        ):
            raise ObservationError(f"observation {EPISODE_KEY!r} must hold integers, got {ep!r}")
        if np.any(np.diff(ep) < 0):
            raise ObservationError(f"observation {EPISODE_KEY!r} must not decrease from oldest to latest, got {ep!r}")
    for k, want in obs_shapes.items():
        if k not in obs:
            raise ObservationError(
                f"observation key {k!r} missing (got {sorted(obs)}; the policy expects {sorted(obs_shapes)})"
            )
        x = np.asarray(obs[k])
        want = _shape(want)
        if x.ndim != 1 + len(want) or tuple(x.shape[1:]) != want or x.shape[0] < n_obs_steps:
            raise ObservationError(
                f"observation {k!r} has shape {tuple(x.shape)}; expected (To>={n_obs_steps}, "
                f"{', '.join(map(str, want))})"
            )
        if not np.all(np.isfinite(x)):
            raise ObservationError(f"observation {k!r} contains NaN or inf")
