"""Deterministic regression baseline: the net maps the condition to the data in one pass (MSE to the data).

The same nets serve it: the net is called as net(zeros, t=0, level=log2(M), cond), so a policy's U-Net becomes a
plain behaviour-cloning regressor of the whole action chunk. It tells whether a generative one-step policy beats a
deterministic one on a task (a multimodal demonstration set is where regression averages modes).
"""

from __future__ import annotations

import warnings

import torch

from ..conventions import M
from .base import Objective


class Regression(Objective):
    """loss = ||net(0, 0, log2 M, cond) - x1||^2; sample ignores the noise and the step count (always one pass).

    Shapes: x1 (B, ...) data in normalised units, cond (B, Dc) or None. No random draws in training or sampling.
    """

    name = "regression"

    def __init__(self, m: int = M):
        super().__init__(m)

    def _inputs(self, like: torch.Tensor):
        """The fixed network inputs for a batch shaped like ``like`` (B, ...): x = zeros (B, ...), t = 0 (B,),
        level = log2 M (B,)."""
        B = like.shape[0]
        zeros_t = torch.zeros(B, device=like.device, dtype=like.dtype)
        level = torch.full((B,), float(self.log2_m), device=like.device, dtype=like.dtype)
        return torch.zeros_like(like), zeros_t, level

    def check_steps(self, steps) -> int:
        """Any positive integer is accepted; values other than 1 warn (regression always makes one pass)."""
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
            raise ValueError(f"steps={steps!r}: expected a positive integer (regression always uses 1 pass)")
        if int(steps) != 1:
            warnings.warn(
                f"objective=regression ignores steps={steps}: it always makes one deterministic pass", stacklevel=3
            )
        return 1

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """(loss, info): MSE between net(0, 0, log2 M, cond) and x1 (B, ...)."""
        self.check_data(x1)
        x, t, level = self._inputs(x1)
        loss = self.check_loss(self.row_mse(net(x, t, level, cond), x1).mean())
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int = 1, null_cond=None, cfg_scale=None):
        """x0 (B, ...) only gives the shape; returns net(0, 0, log2 M, cond) shaped like x0."""
        self.check_steps(steps)
        x, t, level = self._inputs(x0)
        return net(x, t, level, cond)
