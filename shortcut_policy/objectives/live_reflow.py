"""Live reflow: the shortcut paper's `livereflow` baseline (kvfrans/shortcut-models, baselines/targets_livereflow.py).

Reference behaviour (file:line of targets_livereflow.py at commit 6010043), in this project's convention
(t = 0 noise, t = 1 data, x_t = (1-(1-eps)t) x0 + t x1, velocity target x1 - (1-eps) x0):

- L26-44 reflow rows (the first ``bootstrap_size = B // bootstrap_every`` = B/8 rows): from noise x_0, 8 Euler steps
  of size 1/8 of the ONLINE model (``call_model``, not the EMA; no gradient) at the flow-matching level
  ``dt_base = log2(M)``, t = 0, 1/8, ..., 7/8. The velocity is conditional, null-label (cfg_scale == 0) or guided
  ``v_u + cfg_scale (v_c - v_u)`` on the rows' labels.
- L45-51: target ``v = x_8 - x_0`` (the straight line from the noise to the model's own sample) at level 0
  (d = 1), at t on the grid {k/M}, x_t = (1-(1-eps)t) x_0 + t x_8; the student sees the rows' true labels.
- L9-23, L53-57 flow-matching rows (the rest): level log2(M), t on {k/M}, class dropout on these rows only.
- One unweighted MSE over the merged batch (train.py:237-239); the net uses dt (train.py:140: not ignore_dt).
- Sampling (helper_inference.py:100-125): Euler x += v(x, i/N, log2 N) / N, as the shortcut objective.

Deviations (documented; the choices are config options):

- Noise and time draws: the reference reuses the flow-matching rows' noise key and time key for the reflow rows
  (x_0_reflow = x_0[:B/8], t_reflow = t[:B/8]); here every row gets its own draws. With an explicit ``x0`` (B, ...)
  the reflow rows start from ``x0[:nb]`` and the flow-matching rows pair ``x0[nb:]`` with ``x1[nb:]``.
- Batch split: the reference builds the flow-matching rows from ``images[:B - B/8]`` and never uses the last B/8
  images; here they use ``x1[nb:]`` (the same count; equivalent after the loader's shuffling).
  ``x1[:nb]`` only sets the shapes: the reflow rows need no data.
- ``bootstrap_fraction`` (default 0.125 = the reference's 1/8) and ``euler_steps`` (default 8) are options.
- ``teacher``: which model rolls the reflow trajectories out: "online" (reference: the `net` being trained; the
  trainer then passes no separate teacher) or "ema" (the `teacher` argument, e.g. the trainer's EMA model).
- ``sample_level``: the level passed when sampling with N steps: "log2_steps" (default: log2 N, as
  helper_inference.py:106-108 and the shortcut objective) or "reflow" (helper_eval.py:155-156, 197-198: level 0,
  the trained one-step level, for every N < M and log2 M at N = M). Only levels 0 and log2 M are trained, so with
  "log2_steps" the step counts 2..M/2 query levels the net never saw in training.
- Guidance at sampling time only at N = M (as the shortcut objective: the d = 1 rows distil the guided teacher).
"""

from __future__ import annotations

import torch

from ..conventions import M, interpolate, velocity_target
from .base import Objective
from .guidance import guided
from .timesteps import discrete_t


class LiveReflow(Objective):
    """Flow matching plus on-line reflow rows at d = 1 (see the module docstring for the reference mapping).

    Shapes: x1 (B, ...) normalised data; cond (B, Dc) features, (B,) labels or None; x0 (B, ...) noise like x1.
    The net is called as net(x_t (B, ...), t (B,), level (B,), cond) with level 0 (reflow rows) or log2 M.
    """

    name = "live_reflow"
    uses_step_size = True

    def __init__(
        self,
        m: int = M,
        bootstrap_fraction: float = 0.125,
        euler_steps: int = 8,
        teacher: str = "online",
        sample_level: str = "log2_steps",
        class_dropout_prob: float = 0.0,
        cfg_scale: float | None = None,
    ):
        super().__init__(m)
        if not 0.0 < float(bootstrap_fraction) < 1.0:
            raise ValueError(
                f"objective.bootstrap_fraction={bootstrap_fraction}: expected a value in (0, 1) "
                "(the reference: 0.125 = B/8 reflow rows)"
            )
        if isinstance(euler_steps, bool) or int(euler_steps) != euler_steps or int(euler_steps) < 1:
            raise ValueError(f"objective.euler_steps={euler_steps!r}: expected a positive integer (reference: 8)")
        if teacher not in ("online", "ema"):
            raise ValueError(f"objective.teacher={teacher!r}: expected 'online' (reference) or 'ema'")
        if sample_level not in ("log2_steps", "reflow"):
            raise ValueError(f"objective.sample_level={sample_level!r}: expected 'log2_steps' or 'reflow'")
        if not 0.0 <= float(class_dropout_prob) <= 1.0:
            raise ValueError(f"objective.class_dropout_prob={class_dropout_prob}: expected a probability in [0, 1]")
        self.bootstrap_fraction, self.euler_steps = float(bootstrap_fraction), int(euler_steps)
        self.teacher = teacher  # read by Trainer.teacher(); "online": the reflow rollouts use `net` itself
        self.sample_level = sample_level
        self.class_dropout_prob, self.cfg_scale = float(class_dropout_prob), cfg_scale

    def n_reflow(self, batch: int) -> int:
        """Number of reflow (one-step distillation) rows in a batch of ``batch`` rows:
        round(batch * bootstrap_fraction)."""
        return int(round(batch * self.bootstrap_fraction))

    @torch.no_grad()
    def rollout(self, model, x0, cond=None, null_cond=None):
        """x_K (nb, ...) after K = euler_steps Euler steps of `model` from noise x0 (nb, ...) at the flow-matching
        level, t = i/K, guided with cfg_scale when set (targets_livereflow.py:27-44). No gradient."""
        B = x0.shape[0]
        level = torch.full((B,), float(self.log2_m), device=x0.device, dtype=x0.dtype)
        x, k = x0, self.euler_steps
        for i in range(k):
            t = torch.full((B,), i / k, device=x0.device, dtype=x0.dtype)
            x = x + guided(model, x, t, level, cond, null_cond, self.cfg_scale) / k
        return x

    @torch.no_grad()
    def reflow_targets(self, model, x0, t, cond=None, null_cond=None):
        """(x_t, v) for reflow rows: x_K = rollout(x0); v = x_K - x0; x_t = (1-(1-eps)t) x0 + t x_K
        (targets_livereflow.py:45-51). x0 (nb, ...), t (nb,)."""
        xk = self.rollout(model, x0, cond, null_cond)
        return interpolate(x0, xk, t), xk - x0

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """(loss, info) on a batch x1 (B, ...): reflow rows first (level 0), flow-matching rows after (level log2 M)."""
        self.check_data(x1)
        B, dev = x1.shape[0], x1.device
        nb = self.n_reflow(B)
        if nb < 1 or nb >= B:
            raise ValueError(
                f"batch of {B} rows with bootstrap_fraction={self.bootstrap_fraction} leaves {nb} reflow "
                "rows: expected at least one reflow and one flow-matching row"
            )
        x0 = torch.randn_like(x1) if x0 is None else x0
        if self.teacher == "online" or teacher is None:
            roll_model, roll_cond = net, cond
        else:
            roll_model, roll_cond = teacher, (cond if teacher_cond is None else teacher_cond)
        t_r = discrete_t(nb, self.m, dev).to(x1.dtype)
        x_r, v_r = self.reflow_targets(
            roll_model, x0[:nb], t_r, None if roll_cond is None else roll_cond[:nb].detach(), null_cond
        )
        t_f = discrete_t(B - nb, self.m, dev).to(x1.dtype)
        x_f, v_f = interpolate(x0[nb:], x1[nb:], t_f), velocity_target(x0[nb:], x1[nb:])
        x_t, target, t = torch.cat([x_r, x_f]), torch.cat([v_r, v_f.to(v_r.dtype)]), torch.cat([t_r, t_f])
        levels = torch.cat(
            [
                torch.zeros(nb, device=dev, dtype=t.dtype),
                torch.full((B - nb,), float(self.log2_m), device=dev, dtype=t.dtype),
            ]
        )
        return self.split_batch_loss(
            net, x_t, t, levels, target, cond, nb, null_cond, "reflow", self.class_dropout_prob
        )

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None):
        """Euler from noise x0 (B, ...): x += v(x, i/N, level) / N, level log2 N ("log2_steps") or 0 / log2 M
        ("reflow"). Guidance only at N = M."""
        n = self.check_steps(steps)
        if self.sample_level == "reflow":
            level = float(self.log2_m) if n == self.m else 0.0
        else:
            level = float(n.bit_length() - 1)
        scale = (self.cfg_scale if cfg_scale is None else cfg_scale) if n == self.m else None
        return self.euler(net, x0, cond, n, level, null_cond, scale)
