"""Shortcut models (Frans et al. 2024), following the reference implementation's get_targets
(kvfrans/shortcut-models targets_shortcut.py).

A batch is split into bootstrap (self-consistency) rows first and flow-matching rows after.
- FM rows: level log2(M) (d = 1/M), t on {k/M}, target x1 - (1-eps) x0, class dropout here only.
- Bootstrap rows: levels k in {0..log2(M)-1} stratified over the GLOBAL batch (DDP aware), t a multiple of
  d = 2^-k in [0, 1-d], target = clip((v1 + v2)/2) with two no-grad half steps of the teacher at level k+1:
  v1 = f(x_t, t), v2 = f(clip(x_t + d/2 v1), t + d/2). Classifier-free guidance in the teacher only for the
  rows whose teacher is at the FM level (k = log2(M)-1), when `bootstrap_cfg`. Bootstrap rows keep true labels.
- One unweighted MSE over all rows (mean over the non-batch dims, then over rows); ``bootstrap_weight`` != 1 (an option
  of this project, not the reference's) multiplies the bootstrap rows' terms.
Deviation, documented: the two parts use disjoint slices of the batch (the reference reuses the first rows
and drops the last B/8: its issue #10).
"""

from __future__ import annotations

import math

import torch

from ..conventions import CLIP_TARGET, M, interpolate, velocity_target
from .base import Objective, check_preconditioning
from .guidance import guided
from .timesteps import discrete_t, global_levels_for_rank, t_on_level_grid


def check_energy_options(energy_rows, energy_samples, energy_weight) -> None:
    """Raises ``ValueError`` unless energy_rows >= 0 and energy_samples >= 2 are integers and energy_weight >= 0."""
    for key, v, lo in (("energy_rows", energy_rows, 0), ("energy_samples", energy_samples, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"objective.{key}={v!r}: expected an integer >= {lo}")
    if isinstance(energy_weight, bool) or not isinstance(energy_weight, (int, float)) or energy_weight < 0:
        raise ValueError(f"objective.energy_weight={energy_weight!r}: expected a number >= 0 (0 = off)")


def one_step_energy_score(net, x1, cond, m: int) -> torch.Tensor:
    """Energy score of the 1-step sampler against the data (a strictly proper scoring rule: Gneiting & Raftery 2007,
    eq. 22; used to train one-pass generators as "engression", Shen & Meinshausen 2024): for each of the n rows of
    x1 (n, ...) draw m noises x0, take the 1-step samples g = x0 + net(x0, t=0, level 0, cond) and return the mean
    over rows of  mean_i ||g_i - x1|| - 1/(2 m (m-1)) sum_{i != j} ||g_i - g_j||  (Euclidean norms over all non-batch
    dims, normalised units). Its expectation is minimised only by the true conditional distribution of x1 given cond,
    so it sharpens the 1-step sampler towards the data without averaging modes (the second term keeps samples
    apart). ``net`` is the (velocity) net called as net(x, t, level, cond); cond (n, ...) or None is repeated m
    times; gradients flow into net. Not in the shortcut paper or its reference code (an option of this project)."""
    n = x1.shape[0]
    c = None if cond is None else cond.repeat_interleave(m, dim=0)
    x0 = torch.randn((n * m, *x1.shape[1:]), device=x1.device, dtype=x1.dtype)
    zeros = torch.zeros(n * m, device=x1.device, dtype=x1.dtype)
    g = (x0 + net(x0, zeros, zeros, c)).reshape(n, m, -1)
    eps = 1e-8  # keeps the norm's gradient finite at 0
    attract = ((g - x1.reshape(n, 1, -1)).pow(2).sum(-1) + eps).sqrt().mean()
    pair = ((g.unsqueeze(1) - g.unsqueeze(2)).pow(2).sum(-1) + eps).sqrt()  # (n, m, m), zero diagonal up to eps
    repel = (pair.sum((1, 2)) - m * eps**0.5).mean() / (m * (m - 1))
    return attract - 0.5 * repel


class Shortcut(Objective):
    """The shortcut-model objective (Frans et al. 2024, "One Step Diffusion via Shortcut Models"): a velocity net
    conditioned on the step size d = 2^-level, trained with flow matching at d = 1/M plus self-consistency
    (bootstrap) targets for larger d, so that it samples in 1, 2, 4, ..., M steps.

    ``bootstrap_fraction`` of each batch are bootstrap rows (their levels allocated by ``level_allocation``:
    "reference", "cycle" or "dt_bias"); ``clip`` bounds targets and teacher states (the reference's +-4);
    ``target_depth`` teacher steps build a target (2 = the reference's two half steps); ``teacher`` "online" or
    "ema" picks the network that builds targets (read by the trainer); ``preconditioning`` "edm" (with
    ``sigma_data``) makes the net's output EDM-preconditioned (:class:`~shortcut_policy.objectives.base.EDMVelocity`;
    "none", the reference, a raw velocity); ``bootstrap_weight`` multiplies the bootstrap
    rows' terms of the loss (1 = the reference's unweighted mean; not in the paper or the reference; it tests whether
    the flow-matching rows' irreducible target noise, about 100x the bootstrap rows' residuals on Push-T, drowns the
    self-consistency signal: measured, x4 and x16 both lost successes, docs/results/pusht_policies_b256.md).
    ``energy_weight`` > 0 adds ``energy_weight`` times :func:`one_step_energy_score` of the 1-step sampler on the
    last ``energy_rows`` rows of the batch (``energy_samples`` noises each; not in the paper or the reference: it
    anchors the d = 1 level to the data directly instead of only through the chain of self-consistency levels).
    Raises ``ValueError`` for an invalid ``target_depth``, ``bootstrap_fraction``, ``bootstrap_weight``, ``teacher``,
    ``preconditioning``, ``sigma_data`` or energy option.
    Module docstring: the batch layout."""

    name = "shortcut"
    uses_step_size = True
    supports_t_start = True  # sample(t_start=1 - 2^-j): a warm start from a partly denoised window

    def __init__(
        self,
        m: int = M,
        bootstrap_fraction: float = 0.25,
        level_allocation: str = "reference",
        clip: float | None = CLIP_TARGET,
        class_dropout_prob: float = 0.0,
        bootstrap_cfg: bool = False,
        cfg_scale: float | None = None,
        teacher: str = "online",
        target_depth: int = 2,
        bootstrap_weight: float = 1.0,
        preconditioning: str = "none",
        sigma_data: float = 0.5,
        energy_rows: int = 0,
        energy_samples: int = 2,
        energy_weight: float = 0.0,
    ):
        super().__init__(m)
        check_energy_options(energy_rows, energy_samples, energy_weight)
        self.energy_rows, self.energy_samples = int(energy_rows), int(energy_samples)
        self.energy_weight = float(energy_weight)
        self.preconditioning, self.sigma_data = check_preconditioning(preconditioning, sigma_data)
        if isinstance(bootstrap_weight, bool) or not (
            isinstance(bootstrap_weight, (int, float)) and bootstrap_weight > 0
        ):
            raise ValueError(f"bootstrap_weight={bootstrap_weight!r}: expected a positive number (1 = the reference)")
        self.bootstrap_weight = float(bootstrap_weight)
        if (
            isinstance(target_depth, bool)
            or int(target_depth) != target_depth
            or target_depth < 2
            or (int(target_depth) & (int(target_depth) - 1))
        ):
            raise ValueError(
                f"target_depth={target_depth!r}: expected a power of two >= 2 (2 = the reference's two half steps)"
            )
        self.target_depth = int(target_depth)
        if not 0.0 < bootstrap_fraction < 1.0:
            raise ValueError(f"bootstrap_fraction={bootstrap_fraction}: expected a value in (0, 1), e.g. 0.25 or 0.125")
        if teacher not in ("ema", "online"):
            raise ValueError(f"teacher={teacher!r}: expected 'ema' or 'online'")
        self.bootstrap_fraction, self.level_allocation, self.clip = bootstrap_fraction, level_allocation, clip
        self.class_dropout_prob, self.bootstrap_cfg, self.cfg_scale = class_dropout_prob, bootstrap_cfg, cfg_scale
        self.teacher = teacher  # read by the trainer / model to pick the teacher network

    def n_bootstrap(self, batch: int) -> int:
        """Number of bootstrap (self-consistency) rows in a batch of ``batch`` rows:
        round(batch * bootstrap_fraction)."""
        return int(round(batch * self.bootstrap_fraction))

    def _clip(self, x):
        """x clamped to [-clip, clip] (unchanged when ``clip`` is None)."""
        return x if self.clip is None else x.clamp(-self.clip, self.clip)

    def substeps(self, levels: torch.Tensor) -> torch.Tensor:
        """Teacher steps per bootstrap row: min(target_depth, d * M) for d = 2^-level (the reference: always 2)."""
        return torch.minimum(torch.full_like(levels, self.target_depth), 2 ** (self.log2_m - levels))

    @torch.no_grad()
    def bootstrap_targets(self, teacher, x_t, t, levels, cond, null_cond):
        """Self-consistency targets (B_b, ...) for bootstrap rows at `levels` (B_b,): the clipped mean velocity of n
        no-grad Euler steps of the teacher over [t, t + d] at level log2(n/d), n = `substeps` (the reference's
        targets_shortcut.py: n = 2, two half steps at level k + 1, the second at t + d/2; states and target clipped).
        Classifier-free guidance only for rows whose teacher sits at the flow-matching level."""
        scale = self.cfg_scale if (self.bootstrap_cfg and null_cond is not None) else None
        if self.target_depth == 2:  # the reference: every row takes two half steps (no grouping, no host sync)
            return self._integrate(teacher, x_t, t, levels, cond, null_cond, scale, 2)
        target = torch.empty_like(x_t)
        n_sub = self.substeps(levels.long())
        for n in sorted(set(n_sub.tolist())):
            rows = (n_sub == n).nonzero().squeeze(1)
            c = None if cond is None else cond[rows]
            target[rows] = self._integrate(teacher, x_t[rows], t[rows], levels[rows], c, null_cond, scale, n)
        return target

    def _integrate(self, teacher, x_t, t, levels, cond, null_cond, scale, n: int):
        """Clipped mean velocity of n no-grad Euler steps of the teacher over [t, t + d], d = 2^-level, at level
        level + log2 n (states clipped after each step); guided only where that level is the FM level."""
        lv = levels.float() + float(n.bit_length() - 1)  # level of the teacher's sub-steps
        sub_d = (2.0 ** -levels.float() / n).reshape(-1, *([1] * (x_t.dim() - 1)))
        gidx = (lv == self.log2_m).nonzero().squeeze(1) if scale is not None else None
        x, tt, acc = x_t, t, torch.zeros_like(x_t)
        for _ in range(n):
            v = teacher(x, tt, lv, cond)
            if gidx is not None and gidx.numel():
                v = v.clone()
                v[gidx] = guided(teacher, x[gidx], tt[gidx], lv[gidx], cond[gidx], null_cond, scale)
            acc = acc + v
            x = self._clip(x + sub_d * v)
            tt = tt + sub_d.reshape(-1)
        return self._clip(acc / n)

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """Shortcut loss on x1 (B, ...): bootstrap rows first (levels 0..log2 M - 1, targets from ``teacher``),
        flow-matching rows after (level log2 M); one unweighted MSE over all rows. Raises ``ValueError`` when the batch
        leaves no bootstrap or no flow-matching row. Returns ``(loss, info)`` with ``loss_bootstrap``, ``loss_flow`` and
        ``bootstrap_ratio``."""
        self.check_data(x1)
        B, dev = x1.shape[0], x1.device
        nb = self.n_bootstrap(B)
        if nb < 1 or nb >= B:
            raise ValueError(
                f"batch of {B} rows with bootstrap_fraction={self.bootstrap_fraction} leaves {nb} bootstrap "
                "rows: expected at least one bootstrap and one flow-matching row"
            )
        teacher = self.velocity_net(net if teacher is None else teacher)
        net = self.velocity_net(net)
        x0 = torch.randn_like(x1) if x0 is None else x0
        lv_b = global_levels_for_rank(nb, self.log2_m, self.level_allocation).to(dev)
        t_b = t_on_level_grid(lv_b)
        t_f = discrete_t(B - nb, self.m, dev)
        t = torch.cat([t_b, t_f])
        levels = torch.cat([lv_b.float(), torch.full((B - nb,), float(self.log2_m), device=dev)])
        x_t = interpolate(x0, x1, t)
        tcond = cond if teacher_cond is None else teacher_cond
        target_b = self.bootstrap_targets(
            teacher, x_t[:nb], t_b, lv_b, None if tcond is None else tcond[:nb], null_cond
        )
        target_f = velocity_target(x0[nb:], x1[nb:])
        target = torch.cat([target_b, target_f.to(target_b.dtype)])
        loss, info = self.split_batch_loss(
            net,
            x_t,
            t,
            levels,
            target,
            cond,
            nb,
            null_cond,
            "bootstrap",
            self.class_dropout_prob,
            self.bootstrap_weight,
        )
        if self.energy_weight > 0 and self.energy_rows > 0:
            n = min(self.energy_rows, B)
            es = one_step_energy_score(net, x1[-n:], None if cond is None else cond[-n:], self.energy_samples)
            loss = self.check_loss(loss + self.energy_weight * es)
            info.update(loss=loss.item(), energy_score=es.item())
        return loss, info

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None, t_start: float = 0.0):
        """Euler with d = (1 - t_start)/N at t = t_start + i d and level log2(1/d) (t_start = 0: d = 1/N, level
        log2 N). Guidance only at the FM level d = 1/M; larger steps use one conditional pass (the guidance was
        distilled in training). ``t_start`` = 1 - 2^-j starts from a partly denoised x0 (a warm start, see
        :meth:`check_t_start`); each step then lies on the grid the model was trained on."""
        n = self.check_steps(steps)
        ts = self.check_t_start(t_start, n)
        level = round(math.log2(n / (1.0 - ts)))
        scale = (self.cfg_scale if cfg_scale is None else cfg_scale) if level == self.log2_m else None
        return self.euler(self.velocity_net(net), x0, cond, n, float(level), null_cond, scale, t_start=ts)
