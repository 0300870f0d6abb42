"""Flow matching (rectified flow) with Euler sampling: the reference's `naive` baseline."""

from __future__ import annotations

import torch

from ..conventions import M, interpolate, velocity_target
from .base import Objective, check_preconditioning
from .guidance import drop_cond
from .timesteps import discrete_t


class FlowMatching(Objective):
    """x_t = (1-(1-eps)t) x0 + t x1, target v = x1 - (1-eps) x0, t on the grid {k/M} (reference) or U[0,1).

    The network's step-size input is held at the flow-matching level log2(M) (the reference zeroes it).
    ``preconditioning="edm"`` (with ``sigma_data``) preconditions the net's output
    (:class:`~shortcut_policy.objectives.base.EDMVelocity`); "none" (the reference) is a raw velocity. Raises
    ``ValueError`` for an invalid ``t_sampling``, ``preconditioning`` or ``sigma_data``.
    """

    name = "flow_matching"
    supports_t_start = True  # sample(t_start=...): Euler from a partly denoised window

    def __init__(
        self,
        m: int = M,
        t_sampling: str = "discrete",
        class_dropout_prob: float = 0.0,
        cfg_scale: float | None = None,
        preconditioning: str = "none",
        sigma_data: float = 0.5,
    ):
        super().__init__(m)
        self.preconditioning, self.sigma_data = check_preconditioning(preconditioning, sigma_data)
        if t_sampling not in ("discrete", "uniform"):
            raise ValueError(f"t_sampling={t_sampling!r}: expected 'discrete' or 'uniform'")
        self.t_sampling, self.class_dropout_prob, self.cfg_scale = t_sampling, class_dropout_prob, cfg_scale

    def sample_t(self, n, device, generator=None):
        """n training times (n,) in [0, 1): on the grid {k/M} (``t_sampling="discrete"``, the reference) or
        uniform; drawn from ``generator`` when given."""
        if self.t_sampling == "discrete":
            return discrete_t(n, self.m, device, generator)
        return torch.rand(n, device=device, generator=generator)

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """Flow-matching loss on x1 (B, ...): MSE between net(x_t, t, log2 M, cond) and the velocity
        x1 - (1 - eps) x0, x_t from :func:`~shortcut_policy.conventions.interpolate`. Class dropout with
        ``class_dropout_prob``. Returns ``(loss, {"loss", "loss_flow"})``."""
        self.check_data(x1)
        B = x1.shape[0]
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = self.sample_t(B, x1.device)
        level = torch.full((B,), float(self.log2_m), device=x1.device)
        cond_in = drop_cond(cond, null_cond, self.class_dropout_prob)
        pred = self.velocity_net(net)(interpolate(x0, x1, t), t, level, cond_in)
        loss = self.check_loss(self.row_mse(pred, velocity_target(x0, x1)).mean())
        return loss, {"loss": loss.item(), "loss_flow": loss.item()}

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None, t_start: float = 0.0):
        """Euler integration from x0 (B, ...) at t = ``t_start`` (0: noise; see :meth:`check_t_start`) in ``steps``
        steps of size (1 - t_start)/N, the level input held at log2 M; classifier-free guidance with ``cfg_scale``
        (None: the objective's). Returns x at t = 1."""
        n = self.check_steps(steps)
        ts = self.check_t_start(t_start, n)
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        return self.euler(self.velocity_net(net), x0, cond, n, float(self.log2_m), null_cond, scale, t_start=ts)
