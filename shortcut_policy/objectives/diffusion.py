"""DDPM training with epsilon prediction and DDPM / DDIM sampling through diffusers schedulers,
configured as Diffusion Policy (100 train steps, squaredcos_cap_v2, clip_sample, fixed_small variance).

Time input (``time_input``): ``"step"`` (default) feeds the net Diffusion Policy's integer DDPM step k (0 = least
noise, K - 1 = most), embedded as it is (the objective sets the net's time scale to 1, ``net_time_scale``), so a
Diffusion Policy checkpoint predicts exactly as in Diffusion Policy. ``"flipped"`` is the behaviour of checkpoint
format 1: t = 1 - k/K in the project's flow convention (t = 0 noise, t = 1 data), scaled by the net's own
``time_scale`` (100 - k for the U-Net); checkpoints of that format are migrated to it
(:mod:`shortcut_policy.checkpoint`). The step-size input is held at the flow-matching level; the objective does
not use a step size (``uses_step_size = False``), so nets built for it have no step-size branch.

Warm start (``sample(t_start=tau)``, eval ``warm_start=``; not in Diffusion Policy): the window the policy passes is
the flow interpolant x_tau = (1 - (1 - eps) tau) z + tau prior. It enters the DDPM chain at the step k0 whose
signal-to-noise ratio abar / (1 - abar) is nearest to the interpolant's (tau / (1 - (1 - eps) tau))^2, rescaled to
DDPM's variance-preserving scale (divided by sqrt(a^2 + b^2), a = tau, b = 1 - (1 - eps) tau), and is denoised from
k0 in ``steps`` steps (SDEdit, Meng et al. 2022, with this project's interpolant), so that a DDPM policy can be
compared with a warm-started shortcut policy at the same number of network evaluations per chunk.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..conventions import INTERP_EPS, M
from .base import Objective
from .guidance import drop_cond, guided


class Diffusion(Objective):
    """DDPM with epsilon prediction (Ho et al. 2020) as configured by Diffusion Policy (Chi et al. 2023):
    K = ``num_train_timesteps`` training steps, ``squaredcos_cap_v2`` betas, clipped samples, fixed-small variance.

    Sampling runs diffusers' ``DDPMScheduler`` or ``DDIMScheduler`` (``sampler``) over ``steps`` <= K steps. The
    net is called as net(x_k (B, ...), t (B,), level = log2(M) (B,), cond) with t = k (``time_input="step"``,
    Diffusion Policy's input; the net embeds it unscaled) or t = 1 - k/K (``"flipped"``, checkpoint format 1).
    Raises ``ValueError`` for an unknown ``sampler`` or ``time_input``."""

    name = "diffusion"
    takes_generator = True
    supports_t_start = True  # warm start: enter the chain at the DDPM step matching t_start's noise level
    TIME_INPUTS = ("step", "flipped")

    def __init__(
        self,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        sampler: str = "ddpm",
        class_dropout_prob: float = 0.0,
        cfg_scale: float | None = None,
        m: int = M,
        time_input: str = "step",
    ):
        super().__init__(m)
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler={sampler!r}: expected 'ddpm' or 'ddim'")
        if time_input not in self.TIME_INPUTS:
            raise ValueError(
                f"objective.time_input={time_input!r}: expected 'step' (Diffusion Policy's DDPM step k) or "
                "'flipped' (t = 1 - k/K, checkpoint format 1)"
            )
        self.time_input = time_input
        kw = dict(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
        )
        self.ddpm = DDPMScheduler(variance_type="fixed_small", **kw)
        self.ddim = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, **kw)
        self.K, self.sampler = num_train_timesteps, sampler
        self.prediction_type, self.class_dropout_prob, self.cfg_scale = prediction_type, class_dropout_prob, cfg_scale

    @property
    def net_time_scale(self) -> float | None:
        """1.0 with ``time_input="step"``: the net embeds the integer step k as it is (Diffusion Policy); None
        (``"flipped"``): the net's configured time scale."""
        return 1.0 if self.time_input == "step" else None

    def net_t(self, k: torch.Tensor) -> torch.Tensor:
        """The net's time input for DDPM steps k (B,) long: k as a float (``time_input="step"``, Diffusion Policy),
        or t = 1 - k/K (``"flipped"``: t = 0 pure noise, t = 1 data, checkpoint format 1)."""
        if self.time_input == "step":
            return k.float()
        return 1.0 - k.float() / self.K

    def deterministic(self) -> bool:
        """DDIM (eta 0) is deterministic given the initial noise; DDPM draws fresh noise at every step."""
        return self.sampler == "ddim"

    def check_steps(self, steps) -> int:
        """Validate a sampling step count: an integer in 1..K (any count, not only powers of two); raises
        ``ValueError`` otherwise."""
        if isinstance(steps, bool) or int(steps) != steps or not 1 <= int(steps) <= self.K:
            raise ValueError(f"steps={steps!r}: diffusion sampling expects an integer in 1..{self.K}")
        return int(steps)

    def start_step(self, t_start: float) -> int:
        """The DDPM step k0 in 0..K-1 whose signal-to-noise ratio abar_k / (1 - abar_k) is nearest (in log) to that
        of the flow interpolant at t = ``t_start`` in (0, 1): (t / (1 - (1 - eps) t))^2."""
        a, b = float(t_start), 1.0 - (1.0 - INTERP_EPS) * float(t_start)
        abar = self.ddpm.alphas_cumprod.double()
        log_snr = torch.log(abar) - torch.log1p(-abar)
        return int(torch.argmin((log_snr - 2.0 * math.log(a / b)).abs()))

    def check_t_start(self, t_start, steps: int) -> float:
        """Validate a warm-start time: 0 (from noise) or t in (0, 1) whose DDPM step k0 (:meth:`start_step`) leaves
        room for ``steps`` distinct steps (k0 + 1 >= steps). Returns it as a float; raises ``ValueError``."""
        ts = self.parse_t_start(t_start)
        if ts == 0.0:
            return 0.0
        k0 = self.start_step(ts)
        if k0 + 1 < self.check_steps(steps):
            raise ValueError(
                f"t_start={ts} enters the DDPM chain at step {k0}, which leaves {k0 + 1} denoising steps; "
                f"steps={steps} needs a smaller t_start"
            )
        return ts

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """DDPM loss on x1 (B, ...): k ~ U{0..K-1}, x_k = sqrt(abar_k) x1 + sqrt(1 - abar_k) eps, and the MSE of
        net(x_k, :meth:`net_t` (k), log2 M, cond) against eps (``prediction_type="epsilon"``) or x1 (``"sample"``).
        Class dropout with ``class_dropout_prob``. Returns ``(loss, {"loss": float})``."""
        self.check_data(x1)
        B = x1.shape[0]
        noise = torch.randn_like(x1) if x0 is None else x0
        k = torch.randint(0, self.K, (B,), device=x1.device)
        noisy = self.ddpm.add_noise(x1, noise, k)
        level = torch.full((B,), float(self.log2_m), device=x1.device)
        pred = net(noisy, self.net_t(k), level, drop_cond(cond, null_cond, self.class_dropout_prob))
        target = noise if self.prediction_type == "epsilon" else x1
        loss = self.check_loss(self.row_mse(pred, target).mean())
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def sample(
        self,
        net,
        x0,
        cond=None,
        *,
        steps: int,
        null_cond=None,
        cfg_scale=None,
        sampler: str | None = None,
        generator=None,
        t_start: float = 0.0,
    ):
        """Denoise x0 ~ N(0, I) (B, ...) in ``steps`` scheduler steps (``sampler`` "ddpm" or "ddim"; default the
        objective's). DDPM draws fresh noise at every step from ``generator`` (a ``torch.Generator`` or None).
        Classifier-free guidance with ``cfg_scale`` (None: the objective's). Returns the sample, shaped like x0.

        ``t_start`` > 0 (warm start): x0 is the flow interpolant at t_start (see the module docstring); it is
        rescaled to DDPM's scale and denoised from the step k0 = :meth:`start_step` (t_start) over the steps
        k0 - floor(i (k0 + 1) / n), i = 0..n-1 (DDPM with those custom timesteps; DDIM by :meth:`ddim_step`, to
        abar = 1 after the last). Raises ``ValueError`` via
        :meth:`check_t_start`."""
        n = self.check_steps(steps)
        sampler = sampler or self.sampler
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler={sampler!r}: expected 'ddpm' or 'ddim'")
        if self.check_t_start(t_start, n) > 0.0:
            return self._sample_from(net, x0, cond, n, float(t_start), sampler, null_cond, cfg_scale, generator)
        sched = self.ddpm if sampler == "ddpm" else self.ddim
        sched.set_timesteps(n, device=x0.device)
        x, B = x0, x0.shape[0]
        level = torch.full((B,), float(self.log2_m), device=x.device)
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        for k in sched.timesteps:
            kk = torch.full((B,), int(k), device=x.device)
            out = guided(net, x, self.net_t(kk), level, cond, null_cond, scale)
            x = sched.step(out, int(k), x, generator=generator).prev_sample
        return x

    def _sample_from(self, net, x_t, cond, n, t_start, sampler, null_cond, cfg_scale, generator):
        """The warm-started chain of :meth:`sample` (t_start > 0)."""
        a, b = t_start, 1.0 - (1.0 - INTERP_EPS) * t_start
        k0 = self.start_step(t_start)
        ks = [k0 - (i * (k0 + 1)) // n for i in range(n)]  # distinct since k0 + 1 >= n
        x, B = x_t / math.sqrt(a * a + b * b), x_t.shape[0]
        level = torch.full((B,), float(self.log2_m), device=x.device)
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        if sampler == "ddpm":
            self.ddpm.set_timesteps(timesteps=ks, device=x.device)
            for k in ks:
                kk = torch.full((B,), k, device=x.device)
                out = guided(net, x, self.net_t(kk), level, cond, null_cond, scale)
                x = self.ddpm.step(out, k, x, generator=generator).prev_sample
            return x
        abar = self.ddim.alphas_cumprod.to(device=x.device, dtype=x.dtype)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        for i, k in enumerate(ks):
            kk = torch.full((B,), k, device=x.device)
            out = guided(net, x, self.net_t(kk), level, cond, null_cond, scale)
            x = self.ddim_step(out, x, abar[k], abar[ks[i + 1]] if i + 1 < n else one)
        return x

    def ddim_step(self, out, x, abar_k, abar_prev):
        """One deterministic DDIM update (eta 0) from step k to an earlier step with abar ``abar_prev`` (1: the
        data), as diffusers' ``DDIMScheduler.step`` computes it (default ``use_clipped_model_output=False``): x0 is
        predicted from ``out`` (epsilon or sample prediction) and clipped to +-``clip_sample_range`` when
        ``clip_sample``, while the noise direction uses the unclipped prediction. x, out: (B, ...)."""
        ab, ab_prev = torch.as_tensor(abar_k, dtype=x.dtype), torch.as_tensor(abar_prev, dtype=x.dtype)
        if self.prediction_type == "epsilon":
            x1, eps = (x - (1 - ab).sqrt() * out) / ab.sqrt(), out
        else:
            x1 = out
            eps = (x - ab.sqrt() * x1) / (1 - ab).sqrt()
        if self.ddim.config.clip_sample:
            x1 = x1.clamp(-self.ddim.config.clip_sample_range, self.ddim.config.clip_sample_range)
        return ab_prev.sqrt() * x1 + (1 - ab_prev).sqrt() * eps
