"""A toy environment for tests/test_env_registry.py: a point in the plane reaching a goal.

Everything an environment needs for every verb (demos, train, eval, deploy): a gymnasium env with dict
observations of Box spaces and ``info["success"]``, a ``make(task_cfg)`` that builds it from a task config, and
a scripted expert. Importable by module name (``toy_reach_env``; pytest puts tests/ on sys.path, and the
rollout runner's spawned workers inherit sys.path), so the registry entry reaches the env workers.

* observation ``{"obs": [x, y, goal_x, goal_y]}`` in [-1, 1]; the start and the goal are drawn from the seed;
* action: the position to move towards; the point moves at most ``speed`` per step;
* reward ``1 - distance`` clipped to [0, 1]; success (and termination) when within ``tol`` of the goal;
  truncation after ``max_steps``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class ToyReachEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, max_steps: int = 40, speed: float = 0.15, tol: float = 0.05):
        self.max_steps, self.speed, self.tol = int(max_steps), float(speed), float(tol)
        self.observation_space = spaces.Dict({"obs": spaces.Box(-1.0, 1.0, (4,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.pos = self.goal = np.zeros(2)
        self._t = 0

    def _obs(self):
        return {"obs": np.concatenate([self.pos, self.goal]).astype(np.float32)}

    def _dist(self) -> float:
        return float(np.linalg.norm(self.goal - self.pos))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-0.8, 0.8, 2)
        self.goal = self.np_random.uniform(-0.8, 0.8, 2)
        self._t = 0
        return self._obs(), {"success": False}

    def step(self, action):
        move = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1, 1) - self.pos
        n = np.linalg.norm(move)
        self.pos = self.pos + (move if n <= self.speed else move * (self.speed / n))
        self._t += 1
        success = self._dist() < self.tol
        return (
            self._obs(),
            float(np.clip(1.0 - self._dist(), 0, 1)),
            success,
            self._t >= self.max_steps and not success,
            {"success": success},
        )

    def render(self):
        img = np.full((32, 32, 3), 255, np.uint8)
        for p, c in ((self.goal, (0, 160, 0)), (self.pos, (0, 0, 255))):
            i, j = ((np.asarray(p) + 1) * 15.5).astype(int)
            img[max(0, j - 1) : j + 2, max(0, i - 1) : i + 2] = c
        return img


def make(task_cfg) -> ToyReachEnv:
    """The registry's ``make``: the bare env from a task config (``max_steps``)."""
    get = task_cfg.get if hasattr(task_cfg, "get") else (lambda k, d=None: getattr(task_cfg, k, d))
    return ToyReachEnv(max_steps=int(get("max_steps", 40)))


class ReachExpert:
    """Privileged scripted expert (the registry's ``expert``): heads straight for the goal."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def reset(self, env):
        pass

    def act(self, env):
        return env.unwrapped.goal.astype(np.float32).copy()
