"""Behaviour shared by all objectives: input checks, per-row MSE, Euler sampling."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..conventions import INTERP_EPS, M, check_steps
from ..utils import all_finite
from .guidance import drop_cond, guided


class EDMVelocity:
    """A net whose raw output F is preconditioned into a velocity on this project's interpolant (EDM's
    preconditioning, Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1,
    derived here for the flow path x_t = (1 - a t) x0 + t x1, a = 1 - eps, x0 ~ N(0, 1), data std ``sigma_data``):

        v(x_t, t, s, c) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, t, s, c),
        s_t^2 = (1 - a t)^2 + t^2 sigma_data^2          (the variance of x_t)
        c_skip = (t sigma_data^2 - a (1 - a t)) / s_t^2   (the least-squares linear predictor of v from x_t)
        c_out = sigma_data / s_t, c_in = 1 / s_t          (F's target and input have unit variance)

    At t = 0 this is v = -x0 + sigma_data F, so the 1-step sample x0 + v is sigma_data F: the net predicts the data and
    need not copy the noise through its layers; at t = 1 it predicts -x0 (the noise). Not in the shortcut paper or its
    reference code (option ``preconditioning=edm`` of the flow objectives; default ``none``, the reference's raw
    velocity). Shapes: x (B, ...), t (B,) in [0, 1]; returns (B, ...) like x."""

    def __init__(self, net, sigma_data: float):
        self.net, self.sigma_data = net, float(sigma_data)

    def __call__(self, x, t, step, cond=None):
        tb = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        tb = tb.reshape(-1, *([1] * (x.dim() - 1)))
        a, sd2 = 1.0 - INTERP_EPS, self.sigma_data**2
        noise_std = 1.0 - a * tb
        var = noise_std**2 + tb**2 * sd2
        std = var.sqrt()
        c_skip = (tb * sd2 - a * noise_std) / var
        return c_skip * x + (self.sigma_data / std) * self.net(x / std, t, step, cond)


PRECONDITIONINGS = ("none", "edm")


def check_preconditioning(preconditioning: str, sigma_data) -> tuple[str, float]:
    """Validate the flow objectives' ``preconditioning`` ("none" | "edm") and ``sigma_data`` (a positive number, the
    data's standard deviation in normalised units); returns them as (str, float), raises ``ValueError`` naming the
    bad value."""
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(
            f"preconditioning={preconditioning!r}: expected 'none' (the net predicts the velocity, the reference) "
            "or 'edm' (Karras et al. 2022's c_skip / c_out / c_in)"
        )
    if isinstance(sigma_data, bool) or not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
        raise ValueError(f"sigma_data={sigma_data!r}: expected a positive number (the data's std, normalised units)")
    return preconditioning, float(sigma_data)


class Objective(nn.Module):
    """An objective knows how to build training targets and sample; it never knows what the data is."""

    name = "objective"
    uses_step_size = False
    step_input = "level"  # what the net's third argument means: "level" log2(1/d) or "continuous" d (MeanFlow)
    takes_generator = False  # sample(..., generator=) draws fresh noise between steps (DDPM, consistency)
    supports_t_start = False  # sample(t_start=) from a partly denoised window (warm start): flow objectives
    # uses_step_size: whether the net's step-size input carries information; nets built for an objective that does
    # not use it get no step-size branch (net.use_step_size: auto). net_time_scale: None keeps the net's configured
    # time scale; a number replaces it (diffusion feeds integer DDPM steps, embedded unscaled: 1.0)
    net_time_scale: float | None = None
    preconditioning = "none"  # flow objectives: "edm" wraps the net in EDMVelocity (velocity_net)
    sigma_data = 0.5

    def velocity_net(self, net):
        """The callable this objective treats as its velocity (or noise) field: ``net`` itself, or ``net`` wrapped in
        :class:`EDMVelocity` when ``preconditioning == "edm"``. Every call of the net in training, bootstrap
        targets and sampling goes through it."""
        if self.preconditioning == "edm":
            return EDMVelocity(net, self.sigma_data)
        return net

    def net_options(self) -> dict:
        """What a net built for this objective must know (keyword arguments of
        :func:`shortcut_policy.nets.build_net`): the step-size input's meaning, whether it is used at all (``auto``
        nets get no step-size branch otherwise) and the time scale the objective's time input needs (None: the net's
        own)."""
        return {"step_input": self.step_input, "use_step_size": self.uses_step_size, "time_scale": self.net_time_scale}

    def __init__(self, m: int = M):
        super().__init__()
        self.m = int(m)
        self.log2_m = self.m.bit_length() - 1
        if 2**self.log2_m != self.m:
            raise ValueError(f"M={m}: expected a power of two")

    # --- checks -----------------------------------------------------------------------------------
    @staticmethod
    def check_data(x1: torch.Tensor, what: str = "x1") -> None:
        """Validate a data batch: a floating-point torch tensor (B, ...) with B >= 1 rows, all finite.

        Raises ``TypeError`` (not a tensor / not floating point) or ``ValueError`` (fewer than 2 dims, NaN or inf),
        naming ``what``."""
        if not isinstance(x1, torch.Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(x1).__name__}")
        if not x1.is_floating_point():
            raise TypeError(f"{what}: expected a floating-point tensor, got dtype {x1.dtype}")
        if x1.dim() < 2:
            raise ValueError(f"{what}: expected a batch (B, ...), got shape {tuple(x1.shape)}")
        if not all_finite(x1):
            raise ValueError(f"{what}: contains NaN or inf ({int((~torch.isfinite(x1)).sum())} entries)")

    @staticmethod
    def check_loss(loss: torch.Tensor) -> torch.Tensor:
        """Return ``loss`` (a scalar) unchanged, or raise ``FloatingPointError`` when it is NaN or inf (a
        diverged step: usually the learning rate or un-normalised data)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()}: check the learning rate and the data normalisation"
            )
        return loss

    @staticmethod
    def row_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row mean squared error in float32: pred, target (B, ...) -> (B,) (mean over all non-batch dims)."""
        return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)

    def deterministic(self) -> bool:
        """True when :meth:`sample` is a deterministic function of its initial noise (no fresh noise between
        steps): what an exported graph (noise in, actions out) can reproduce. Default: not ``takes_generator``."""
        return not self.takes_generator

    def check_steps(self, steps) -> int:
        """Validate a sampling step count for this objective: a power of two in 1..M (see
        :func:`shortcut_policy.conventions.check_steps`); returns it as an int, raises ``ValueError`` otherwise."""
        return check_steps(steps, self.m)

    @staticmethod
    def euler(net, x0, cond, n: int, step_value: float, null_cond=None, scale=None, t_start: float = 0.0):
        """The Euler loop every flow-type objective samples with: x += f(x, t_i, step_value, cond) * d with
        d = (1 - t_start) / n and t_i = t_start + i d, i = 0..n-1.

        x0 (B, ...) the state at t = ``t_start`` (noise when 0; a partly denoised window for a warm start); `step_value`
        is what the net's third argument gets for every call (the level log2(1/d) for shortcut, log2(M) for flow
        matching, the step size d for MeanFlow); classifier-free guidance with `scale` (None = one conditional pass).
        Returns x at t = 1, shaped like x0.
        """
        x, B = x0, x0.shape[0]
        d = (1.0 - float(t_start)) / n
        sv = torch.full((B,), float(step_value), device=x.device, dtype=x.dtype)
        for i in range(n):
            t = torch.full((B,), float(t_start) + i * d, device=x.device, dtype=x.dtype)
            x = x + guided(net, x, t, sv, cond, null_cond, scale) * d
        return x

    @staticmethod
    def parse_t_start(t_start) -> float:
        """A warm-start time as a float in [0, 1); ``ValueError`` naming ``t_start`` for anything else."""
        try:
            ts = float(t_start)
        except (TypeError, ValueError):
            raise ValueError(f"t_start={t_start!r}: expected a number in [0, 1)") from None
        if ts != 0.0 and not 0.0 < ts < 1.0:
            raise ValueError(f"t_start={ts}: expected a number in [0, 1)")
        return ts

    def check_t_start(self, t_start, steps: int) -> float:
        """Validate a warm-start time for :meth:`sample`: 0 (from noise), or, for objectives that support it
        (``supports_t_start``), 1 - 2^-j with (1 - t_start) / steps >= 1/M, so that every step of size
        d = (1 - t_start) / steps starts on a multiple of d (the times a shortcut model was trained on). Returns it
        as a float; raises ``ValueError`` otherwise."""
        ts = self.parse_t_start(t_start)
        if ts == 0.0:
            return 0.0
        if not getattr(self, "supports_t_start", False):
            raise ValueError(f"t_start={ts}: objective {self.name} samples from noise only (t_start=0)")
        rest = 1.0 - ts
        j = round(-math.log2(rest)) if 0.0 < rest < 1.0 else 0
        if j < 1 or abs(rest - 2.0**-j) > 1e-9 or rest / steps < 1.0 / self.m - 1e-12:
            raise ValueError(
                f"t_start={ts} with steps={steps}: expected 1 - 2^-j (0.5, 0.75, 0.875, ...) with "
                f"(1 - t_start) / steps >= 1/M = 1/{self.m}"
            )
        return ts

    def split_batch_loss(
        self,
        net,
        x_t,
        t,
        levels,
        target,
        cond,
        n_first: int,
        null_cond,
        first: str,
        class_dropout_prob: float,
        first_weight: float = 1.0,
    ):
        """One MSE over a batch whose first `n_first` rows carry self-made targets (shortcut bootstrap rows,
        live-reflow rows) and whose other rows are flow-matching rows: the mean over rows of the per-row MSE, the
        first rows' terms multiplied by ``first_weight`` (1 = the reference's unweighted mean). Class dropout hits
        only the flow-matching rows (the reference's targets_shortcut.py / targets_livereflow.py). Shapes: x_t,
        target (B, ...); t, levels (B,); cond (B, ...) or None. Returns (loss, info) with loss_<first>, loss_flow
        and <first>_ratio (the logged row losses are unweighted)."""
        if cond is not None:
            cond = torch.cat([cond[:n_first], drop_cond(cond[n_first:], null_cond, class_dropout_prob)])
        rows = self.row_mse(net(x_t, t, levels, cond), target)
        if first_weight == 1.0:
            loss = self.check_loss(rows.mean())
        else:
            loss = self.check_loss((first_weight * rows[:n_first].sum() + rows[n_first:].sum()) / rows.shape[0])
        return loss, {
            "loss": loss.item(),
            f"loss_{first}": rows[:n_first].mean().item(),
            "loss_flow": rows[n_first:].mean().item(),
            f"{first}_ratio": n_first / x_t.shape[0],
        }

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """Training loss on a data batch ``x1`` (B, ...): returns ``(loss, info)`` with ``loss`` a scalar tensor to
        back-propagate and ``info`` a dict of floats to log.

        ``cond`` (B, ...) conditions the net (observation features, class labels); ``teacher`` is the network that
        builds self-consistency targets (EMA or online); ``null_cond`` is the unconditional label for classifier-free
        guidance; ``x0`` (B, ...) fixes the noise (tests); ``teacher_cond`` is the teacher's condition when it differs
        from ``cond``. Subclasses implement it."""
        raise NotImplementedError

    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None):
        """Integrate from noise ``x0`` (B, ...) at t = 0 to a sample at t = 1 (shaped like x0) in ``steps`` network
        evaluations, conditioned on ``cond``; ``cfg_scale`` overrides the objective's guidance scale (None keeps it).
        Subclasses implement it."""
        raise NotImplementedError
