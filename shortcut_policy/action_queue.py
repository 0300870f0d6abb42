"""Timestamped action queue with stale-action dropping and optional temporal ensembling.

Times live on the control grid t_j = t0 + j * dt. A chunk predicted from the observation captured at ``obs_time``
assigns action k to ``obs_time + k * dt`` (Diffusion Policy: action 0 is aligned with the latest observation).
Actions whose time is already past (t + tolerance < now) are dropped when the chunk arrives: this is how inference
latency is absorbed. Without ensembling a newer chunk replaces the queued actions it overlaps; with
``ensemble_k`` the predictions for one tick are averaged with weights exp(-k * i), i = 0 for the oldest (ACT).
"""

from __future__ import annotations

import math

import numpy as np


class ActionQueue:
    """Actions keyed by control tick (see the module docstring): ``t0`` (s) is tick 0, ``dt`` (s) the control period,
    ``tolerance`` (s, < dt) how late an action may still be executed, ``ensemble_k`` the temporal-ensembling rate
    (None: a newer chunk replaces overlapping actions). Counters ``n_dropped_stale``, ``n_dropped_unused``,
    ``n_over_budget``, ``n_dropped_reset`` say what was discarded. Raises ``ValueError`` for dt <= 0 or a tolerance
    outside [0, dt)."""

    def __init__(self, t0: float, dt: float, tolerance: float, ensemble_k: float | None = None):
        if dt <= 0:
            raise ValueError(f"dt={dt}: expected > 0")
        if not 0 <= tolerance < dt:
            raise ValueError(f"tolerance={tolerance}: expected 0 <= tolerance < dt={dt}")
        self.t0, self.dt, self.tolerance = float(t0), float(dt), float(tolerance)
        self.ensemble_k = None if ensemble_k is None else float(ensemble_k)
        self._slots: dict[int, list[tuple[np.ndarray, float]]] = {}  # tick -> [(action, obs_time)] oldest first
        self.n_dropped_stale = 0  # actions discarded on arrival because their time had passed
        self.n_dropped_unused = 0  # queued actions never executed (superseded by time)
        self.n_over_budget = 0  # chunks that arrived entirely stale (their last action was rescheduled)
        self.n_dropped_reset = 0  # queued actions discarded by discard() (an episode reset)

    def tick_of(self, t: float) -> int:
        """The control tick nearest to time ``t`` (seconds)."""
        return int(round((t - self.t0) / self.dt))

    def time_of(self, tick: int) -> float:
        """The time (seconds) of control tick ``tick``: t0 + tick * dt."""
        return self.t0 + tick * self.dt

    def add_chunk(self, actions, obs_time: float, now: float) -> int:
        """Queue a chunk (Ta, Da) predicted from the observation at ``obs_time``; returns how many were stale. Over
        budget (every action already past, as Diffusion Policy's real-robot loop): the chunk's last action is scheduled
        at the next grid tick after ``now`` instead, so a slow policy still moves (counted in n_over_budget)."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2:
            raise ValueError(f"action chunk must be (Ta, Da), got shape {actions.shape}")
        base = self.tick_of(obs_time)
        if abs(self.time_of(base) - obs_time) > 0.5 * self.dt:
            raise ValueError(f"obs_time {obs_time} is not on the control grid")
        stale = 0
        for k, a in enumerate(actions):
            tick = base + k
            if self.time_of(tick) + self.tolerance < now:
                stale += 1
                continue
            if self.ensemble_k is None:
                self._slots[tick] = [(a, obs_time)]
            else:
                self._slots.setdefault(tick, []).append((a, obs_time))
        self.n_dropped_stale += stale
        if stale == len(actions) and len(actions):
            tick = int(math.floor((now - self.t0) / self.dt)) + 1
            self._slots[tick] = [(actions[-1], obs_time)]
            self.n_over_budget += 1
        return stale

    def pop(self, t: float):
        """The action for the grid time ``t`` (None if there is none); older entries are discarded."""
        tick = self.tick_of(t)
        for old in [j for j in self._slots if j < tick]:
            del self._slots[old]
            self.n_dropped_unused += 1
        preds = self._slots.pop(tick, None)
        if not preds:
            return None
        if len(preds) == 1 or self.ensemble_k is None:
            return preds[-1][0].copy()
        w = np.exp(-self.ensemble_k * np.arange(len(preds)))
        w /= w.sum()
        return np.einsum("i,id->d", w, np.stack([p[0] for p in preds]))

    def remaining(self, t: float) -> int:
        """How many consecutive future ticks after ``t`` have an action queued."""
        tick, n = self.tick_of(t), 0
        while (tick + n + 1) in self._slots:
            n += 1
        return n

    def has(self, t: float) -> bool:
        """Whether an action is queued for the tick of time ``t``."""
        return self.tick_of(t) in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def clear(self) -> None:
        """Drop every queued action without counting it."""
        self._slots.clear()

    def discard(self) -> tuple[int, int]:
        """Empty the queue because what it holds is void (the robot reset to a new episode). Returns
        (actions discarded, chunks they came from, told apart by their observation time); the actions are counted
        in n_dropped_reset, not n_dropped_unused."""
        n_actions = len(self._slots)
        n_chunks = len({obs_time for preds in self._slots.values() for _, obs_time in preds})
        self._slots.clear()
        self.n_dropped_reset += n_actions
        return n_actions, n_chunks


def ceil_ticks(seconds: float, dt: float) -> int:
    """The number of control periods ``dt`` needed to cover ``seconds`` (>= 0; exact multiples do not round up)."""
    return max(0, int(math.ceil(seconds / dt - 1e-9)))
