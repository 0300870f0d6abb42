"""The robot protocol the control loop talks to, and the observation-spec checks made before it moves.

A robot exposes
  obs_shapes: {key: per-step shape}, action_dim: int, control_hz: float, n_obs_steps: int
  start(seed) -> t0          reset / home, start its clock; returns the time (time.perf_counter) of tick 0
  get_observation() -> dict  {key: (To, ...) float32} plus "timestamp": (To,) capture times (perf_counter seconds),
                             oldest first; the last entry is the latest observation
  send_action(action, t_exec) queue one action (Da,) to take effect at time t_exec (perf_counter seconds)
  info() -> dict             task figures (e.g. reward, max_reward, success) for reporting
  done: bool                 the episode/task ended (terminated or truncated)
  close()                    stop safely; must be idempotent (the loop calls it on every exit path)
"""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

TIMESTAMP_KEY = "timestamp"


class ObservationError(ValueError):
    """An observation (or an observation spec) does not match what the policy expects."""


@runtime_checkable
class Robot(Protocol):
    obs_shapes: dict
    action_dim: int
    control_hz: float
    n_obs_steps: int

    def start(self, seed: int | None = None) -> float: ...

    def get_observation(self) -> dict: ...

    def send_action(self, action, t_exec: float) -> None: ...

    def info(self) -> dict: ...

    @property
    def done(self) -> bool: ...

    def close(self) -> None: ...


def _shape(s) -> tuple:
    return tuple(int(v) for v in s)


def check_spec(policy_obs_shapes: Mapping, policy_action_dim: int, robot_obs_shapes: Mapping, robot_action_dim: int,
               policy_name: str = "policy", robot_name: str = "robot") -> None:
    """Raise ObservationError naming every key whose shape differs, is missing, or an action-dim mismatch."""
    problems = []
    for k, want in policy_obs_shapes.items():
        if k not in robot_obs_shapes:
            problems.append(f"observation key {k!r} (shape {_shape(want)}) is not provided by {robot_name} "
                            f"(it provides {sorted(robot_obs_shapes)})")
        elif _shape(robot_obs_shapes[k]) != _shape(want):
            problems.append(f"observation {k!r}: {policy_name} expects per-step shape {_shape(want)}, "
                            f"{robot_name} provides {_shape(robot_obs_shapes[k])}")
    if int(policy_action_dim) != int(robot_action_dim):
        problems.append(f"action_dim: {policy_name} outputs {int(policy_action_dim)}, {robot_name} takes {int(robot_action_dim)}")
    if problems:
        raise ObservationError("observation/action spec mismatch: " + "; ".join(problems))


def validate_observation(obs: Mapping, obs_shapes: Mapping, n_obs_steps: int) -> None:
    """Check one robot observation (a dict of (To, ...) arrays plus timestamps) before it reaches the policy."""
    if not isinstance(obs, Mapping):
        raise ObservationError(f"observation must be a dict, got {type(obs).__name__}")
    if TIMESTAMP_KEY not in obs:
        raise ObservationError(f"observation key {TIMESTAMP_KEY!r} missing (got {sorted(obs)})")
    ts = np.asarray(obs[TIMESTAMP_KEY])
    if ts.ndim != 1 or ts.shape[0] < n_obs_steps:
        raise ObservationError(f"observation {TIMESTAMP_KEY!r} has shape {ts.shape}; expected ({n_obs_steps},) or longer")
    for k, want in obs_shapes.items():
        if k not in obs:
            raise ObservationError(f"observation key {k!r} missing (got {sorted(obs)}; the policy expects {sorted(obs_shapes)})")
        x = np.asarray(obs[k])
        want = _shape(want)
        if x.ndim != 1 + len(want) or tuple(x.shape[1:]) != want or x.shape[0] < n_obs_steps:
            raise ObservationError(f"observation {k!r} has shape {tuple(x.shape)}; expected (To>={n_obs_steps}, "
                                   f"{', '.join(map(str, want))})")
        if not np.all(np.isfinite(x)):
            raise ObservationError(f"observation {k!r} contains NaN or inf")
