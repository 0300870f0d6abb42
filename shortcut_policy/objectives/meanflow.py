"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

The net predicts the *average* velocity over a step: u(x_t, t, d) = (1/d) * integral_t^{t+d} v(x_s, s) ds, so one
step of size d is exact: x_{t+d} = x_t + d u(x_t, t, d). Written in this project's convention (t = 0 noise, t = 1
data, x_t = (1-(1-eps)t) x0 + t x1; the paper's t runs the other way), differentiating d * u = integral over the
start time t with the end point s = t + d fixed gives the MeanFlow identity

    u(x_t, t, d) = v(x_t, t) + d * du/dt,      du/dt = v . grad_x u + d_t u - d_d u   (the total derivative, s fixed)

Training regresses u_theta onto sg(v + d * du_theta/dt) with v the conditional velocity x1 - (1-eps) x0; du/dt is one
Jacobian-vector product of the net with tangents (v, 1, -1) (`torch.func.jvp`), or a central finite difference
(`jvp=finite_difference`). `tangent=model` replaces the conditional velocity in the JVP tangent by the net's own
instantaneous velocity u_theta(x_t, t, 0) (no gradient), as improved MeanFlow does (Geng, Lu, Wu, Shechtman, Kolter,
He 2025, arXiv 2512.02012: the noisy conditional velocity times the net's Jacobian makes the target's variance grow
with the net's steepness); the regression target keeps the conditional v. Loss: adaptive weighting sg(w) * ||Delta||^2
with w = 1 / (||Delta||^2 + c)^p (paper eq. 9-10; ||.||^2 is the per-row mean here, as `row_mse`). (t, s) are two
draws of a logit-normal (or uniform) time, t the smaller; a fraction `flow_fraction` of rows has d = 0 (plain flow
matching, the paper's r = t rows: 75 %).

The net needs a continuous step-size input (`net.step_input=continuous`): the third argument is d in [0, 1].
Sampling: N Euler steps of the average velocity, x += (1/N) u(x, i/N, 1/N); any N >= 1.
"""

from __future__ import annotations

import torch
from torch.func import jvp

from ..conventions import M, interpolate, velocity_target
from .base import Objective
from .guidance import drop_cond


class MeanFlow(Objective):
    """Average-velocity objective. Shapes: x1 (B, ...) normalised data, cond (B, Dc) or labels (B,) or None."""

    name = "meanflow"
    uses_step_size = True
    step_input = "continuous"

    def __init__(
        self,
        m: int = M,
        flow_fraction: float = 0.75,
        time_dist: str = "logit_normal",
        logit_mean: float = 0.4,
        logit_std: float = 1.0,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        jvp: str = "autograd",
        fd_eps: float = 1e-3,
        tangent: str = "conditional",
        class_dropout_prob: float = 0.0,
        cfg_scale: float | None = None,
    ):
        super().__init__(m)
        if not 0.0 <= flow_fraction < 1.0:
            raise ValueError(
                f"objective.flow_fraction={flow_fraction}: expected a value in [0, 1) (share of d = 0 rows)"
            )
        if time_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"objective.time_dist={time_dist!r}: expected 'logit_normal' or 'uniform'")
        if jvp not in ("autograd", "finite_difference"):
            raise ValueError(f"objective.jvp={jvp!r}: expected 'autograd' (torch.func.jvp) or 'finite_difference'")
        if tangent not in ("conditional", "model"):
            raise ValueError(
                f"objective.tangent={tangent!r}: expected 'conditional' (the paper: x1 - x0) or 'model' (improved "
                f"MeanFlow: the net's own velocity at d = 0)"
            )
        self.tangent = tangent
        self.flow_fraction, self.time_dist = float(flow_fraction), time_dist
        # logit_mean 0.4 here = the paper's -0.4 (its t = 1 is noise; ours is data)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.adaptive_p, self.adaptive_c, self.jvp, self.fd_eps = (
            float(adaptive_p),
            float(adaptive_c),
            jvp,
            float(fd_eps),
        )
        self.class_dropout_prob, self.cfg_scale = class_dropout_prob, cfg_scale

    def check_steps(self, steps) -> int:
        """Any integer N >= 1 (the average velocity is defined for every step size)."""
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
            raise ValueError(f"steps={steps!r}: MeanFlow sampling expects an integer >= 1")
        return int(steps)

    @staticmethod
    def check_net(net) -> None:
        """Raises ValueError unless the net embeds a continuous step size (`step_input == 'continuous'`)."""
        mode = getattr(net, "step_input", None)
        if mode != "continuous":
            raise ValueError(
                f"objective=meanflow needs a net with a continuous step-size input (net.step_input="
                f"continuous); {type(net).__name__} has step_input={mode!r}"
            )

    def sample_times(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, d): start times t in [0, 1) and step sizes d >= 0 with t + d <= 1; flow_fraction of rows have d = 0."""
        if self.time_dist == "uniform":
            a, b = torch.rand(n, device=device), torch.rand(n, device=device)
        else:
            a = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))
            b = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))
        t, s = torch.minimum(a, b), torch.maximum(a, b)
        flow_rows = torch.rand(n, device=device) < self.flow_fraction
        d = torch.where(flow_rows, torch.zeros_like(t), s - t)
        return t, d

    @torch.no_grad()
    def time_derivative(self, net, x_t, t, d, v, cond):
        """du/dt along the trajectory with the end point fixed: JVP with tangents (v, 1, -1). No gradient."""
        if self.jvp == "finite_difference":
            h = self.fd_eps
            up = net(x_t + h * v, t + h, d - h, cond)
            dn = net(x_t - h * v, t - h, d + h, cond)
            return (up - dn) / (2.0 * h)
        ones = torch.ones_like(t)
        _, dudt = jvp(lambda x, tt, dd: net(x, tt, dd, cond), (x_t, t, d), (v, ones, -ones))
        return dudt

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """(loss, info) of the MeanFlow identity on a batch x1 (B, ...); `teacher` is unused (self-targets)."""
        self.check_data(x1)
        self.check_net(net)
        B = x1.shape[0]
        x0 = torch.randn_like(x1) if x0 is None else x0
        t, d = self.sample_times(B, x1.device)
        x_t = interpolate(x0, x1, t)
        v = velocity_target(x0, x1)
        cond_in = drop_cond(cond, null_cond, self.class_dropout_prob)
        if self.tangent == "model":  # improved MeanFlow: the net's marginal velocity estimate as the JVP tangent
            with torch.no_grad():
                tan = net(x_t, t, torch.zeros_like(d), cond_in)
        else:
            tan = v
        dudt = self.time_derivative(net, x_t, t, d, tan, cond_in)
        target = (v + d.reshape(-1, *([1] * (x1.dim() - 1))) * dudt).detach()
        pred = net(x_t, t, d, cond_in)
        err = self.row_mse(pred, target)
        w = 1.0 / (err.detach() + self.adaptive_c) ** self.adaptive_p if self.adaptive_p > 0 else torch.ones_like(err)
        loss = self.check_loss((w * err).mean())
        flow = d == 0
        return loss, {
            "loss": loss.item(),
            "mse": err.mean().item(),
            "mse_flow": err[flow].mean().item() if bool(flow.any()) else float("nan"),
            "mse_mean": err[~flow].mean().item() if bool((~flow).any()) else float("nan"),
        }

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None):
        """N Euler steps of the average velocity from x0 (B, ...) noise: x += u(x, i/N, 1/N) / N."""
        n = self.check_steps(steps)
        self.check_net(net)
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        return self.euler(net, x0, cond, n, 1.0 / n, null_cond, scale)  # step size d = 1/N
