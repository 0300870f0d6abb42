"""Shortcut models (Frans et al. 2024), following the reference implementation's get_targets.

A batch is split into bootstrap (self-consistency) rows first and flow-matching rows after.
- FM rows: level log2(M) (d = 1/M), t on {k/M}, target x1 - (1-eps) x0, class dropout here only.
- Bootstrap rows: levels k in {0..log2(M)-1} stratified over the GLOBAL batch (DDP aware), t a multiple of
  d = 2^-k in [0, 1-d], target = clip((v1 + v2)/2) with two no-grad half steps of the teacher at level k+1:
  v1 = f(x_t, t), v2 = f(clip(x_t + d/2 v1), t + d/2). Classifier-free guidance in the teacher only for the
  rows whose teacher is at the FM level (k = log2(M)-1), when `bootstrap_cfg`. Bootstrap rows keep true labels.
- One unweighted MSE over all rows (mean over the non-batch dims, then over rows).
Deviation, documented: the two parts use disjoint slices of the batch (the reference reuses the first rows
and drops the last B/8: its issue #10).
"""
from __future__ import annotations

import torch

from ..conventions import CLIP_TARGET, interpolate, velocity_target
from .base import Objective
from .guidance import drop_cond, guided
from .timesteps import discrete_t, global_levels_for_rank, t_on_level_grid


class Shortcut(Objective):
    name = "shortcut"
    uses_step_size = True

    def __init__(self, m: int = 128, bootstrap_fraction: float = 0.25, level_allocation: str = "reference",
                 clip: float | None = CLIP_TARGET, class_dropout_prob: float = 0.0, bootstrap_cfg: bool = False,
                 cfg_scale: float | None = None, teacher: str = "online"):
        super().__init__(m)
        if not 0.0 < bootstrap_fraction < 1.0:
            raise ValueError(f"bootstrap_fraction={bootstrap_fraction}: expected a value in (0, 1), e.g. 0.25 or 0.125")
        if teacher not in ("ema", "online"):
            raise ValueError(f"teacher={teacher!r}: expected 'ema' or 'online'")
        self.bootstrap_fraction, self.level_allocation, self.clip = bootstrap_fraction, level_allocation, clip
        self.class_dropout_prob, self.bootstrap_cfg, self.cfg_scale = class_dropout_prob, bootstrap_cfg, cfg_scale
        self.teacher = teacher  # read by the trainer / model to pick the teacher network

    def n_bootstrap(self, batch: int) -> int:
        return int(round(batch * self.bootstrap_fraction))

    def _clip(self, x):
        return x if self.clip is None else x.clamp(-self.clip, self.clip)

    @torch.no_grad()
    def bootstrap_targets(self, teacher, x_t, t, levels, cond, null_cond):
        d = (2.0 ** -levels.float()).reshape(-1, *([1] * (x_t.dim() - 1)))
        lv_half = (levels + 1).float()
        scale = self.cfg_scale if (self.bootstrap_cfg and null_cond is not None) else None
        guided_rows = levels == self.log2_m - 1  # teacher at the FM level: the only guided rows

        def f(x, tt):
            v = teacher(x, tt, lv_half, cond)
            if scale is not None and bool(guided_rows.any()):
                idx = guided_rows.nonzero().squeeze(1)
                v = v.clone()
                v[idx] = guided(teacher, x[idx], tt[idx], lv_half[idx], cond[idx], null_cond, scale)
            return v

        v1 = f(x_t, t)
        x2 = self._clip(x_t + 0.5 * d * v1)
        v2 = f(x2, t + 0.5 * d.reshape(-1))
        return self._clip(0.5 * (v1 + v2))

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        self.check_data(x1)
        B, dev = x1.shape[0], x1.device
        nb = self.n_bootstrap(B)
        if nb < 1 or nb >= B:
            raise ValueError(f"batch of {B} rows with bootstrap_fraction={self.bootstrap_fraction} leaves {nb} bootstrap "
                             "rows: expected at least one bootstrap and one flow-matching row")
        teacher = net if teacher is None else teacher
        x0 = torch.randn_like(x1) if x0 is None else x0
        lv_b = global_levels_for_rank(nb, self.log2_m, self.level_allocation).to(dev)
        t_b = t_on_level_grid(lv_b)
        t_f = discrete_t(B - nb, self.m, dev)
        t = torch.cat([t_b, t_f])
        levels = torch.cat([lv_b.float(), torch.full((B - nb,), float(self.log2_m), device=dev)])
        x_t = interpolate(x0, x1, t)
        tcond = cond if teacher_cond is None else teacher_cond
        target_b = self.bootstrap_targets(teacher, x_t[:nb], t_b, lv_b, None if tcond is None else tcond[:nb], null_cond)
        target_f = velocity_target(x0[nb:], x1[nb:])
        target = torch.cat([target_b, target_f.to(target_b.dtype)])
        if cond is not None:
            cond = torch.cat([cond[:nb], drop_cond(cond[nb:], null_cond, self.class_dropout_prob)])
        pred = net(x_t, t, levels, cond)
        rows = self.row_mse(pred, target)
        loss = self.check_loss(rows.mean())
        return loss, {"loss": loss.item(), "loss_bootstrap": rows[:nb].mean().item(),
                      "loss_flow": rows[nb:].mean().item(), "bootstrap_ratio": nb / B}

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None):
        """Euler with d = 1/N at t = i/N and level log2(N). Guidance only at N = M (the unguided FM level);
        fewer steps use one conditional pass (the guidance was distilled in training)."""
        n = self.check_steps(steps)
        scale = (self.cfg_scale if cfg_scale is None else cfg_scale) if n == self.m else None
        return self.euler(net, x0, cond, n, float(n.bit_length() - 1), null_cond, scale)  # level log2(N)
