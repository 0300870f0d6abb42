"""Exponential moving average of a model's weights with an optional warm-up of the decay.

decay(step) = min(max_decay, 1 - (1 + step / inv_gamma) ** -power)  (Diffusion Policy's power schedule), or the
constant max_decay from step 0 (the reference's 0.999). A slow constant EMA used as the shortcut bootstrap
teacher delays one-step ability at short budgets (the 2-D toy benchmark, ``shortcut-policy bench``, shows it).
Buffers (e.g. the normaliser) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An exponential moving average copy of ``model`` (``self.model``, eval mode, no gradients).

    ``decay`` is the maximum decay; ``warmup="power"`` ramps it up as in the module docstring (``power``,
    ``inv_gamma``, floor ``min_decay``), ``"none"`` uses ``decay`` from the first step. Raises ``ValueError`` for an
    unknown ``warmup`` or a ``decay`` outside [0, 1)."""

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        warmup: str = "power",
        power: float = 0.75,
        inv_gamma: float = 1.0,
        min_decay: float = 0.0,
    ):
        if warmup not in ("power", "none"):
            raise ValueError(f"ema.warmup={warmup!r}: expected 'power' or 'none'")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay}: expected a value in [0, 1)")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay, self.warmup, self.power, self.inv_gamma, self.min_decay = (
            decay,
            warmup,
            power,
            inv_gamma,
            min_decay,
        )
        self.step = 0

    def decay(self, step: int | None = None) -> float:
        """The decay used at update number ``step`` (default: the next update): ``decay`` for ``warmup="none"``,
        else clip(1 - (1 + step / inv_gamma) ** -power, min_decay, decay)."""
        step = self.step if step is None else step
        if self.warmup == "none":
            return self.max_decay
        value = 1.0 - (1.0 + step / self.inv_gamma) ** (-self.power)
        return float(min(self.max_decay, max(self.min_decay, value)))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``: trainable parameters p_ema <- d p_ema + (1 - d) p, frozen parameters and
        buffers (the normaliser) copied. Returns the decay d used."""
        d = self.decay()
        for pe, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                pe.lerp_(p.detach(), 1.0 - d)
            else:
                pe.copy_(p.detach())
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)
        self.step += 1
        return d

    def state_dict(self):
        """``{"model": the averaged weights, "step": updates so far}`` (for checkpoints)."""
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, sd):
        """Restore the averaged weights and the update count from :meth:`state_dict`'s output."""
        self.model.load_state_dict(sd["model"])
        self.step = int(sd["step"])
