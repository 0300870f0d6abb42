"""One-step policy from a DDPM teacher by distribution matching (score distillation).

Method: Distribution Matching Distillation (DMD, Yin et al. 2024, "One-step Diffusion with Distribution Matching
Distillation", arXiv 2311.18828, Eq. 7-8 and Algorithm 1), the method OneDP (Wang et al. 2024, "One-Step Diffusion
Policy", arXiv 2410.21257) applies to Diffusion Policy. A one-step generator G is trained so that its samples,
diffused to a random noise level k, have the teacher's score: the gradient pushed into G's sample x is the
difference of two denoisers' data estimates at x_k,

    grad(x) = (x0_fake(x_k, k) - x0_real(x_k, k)) / mean|x - x0_real(x_k, k)|        (DMD Eq. 8, per row)

where x0_real comes from the frozen teacher and x0_fake from a second denoiser ("fake score") that is trained at the
same time, by the ordinary DDPM loss, on G's own samples. Applied as the surrogate loss 0.5 * mean((x - sg(x -
grad))^2), whose gradient with respect to x is grad / numel. DMD's paired regression loss (DMD Eq. 9, Sec. 3.3) is
off by default, as in OneDP's distribution-matching variant; ``regression_weight`` > 0 adds it (next list).

Choices made here (config options, documented in configs/objective/score_distillation.yaml):

- The generator is the policy's own net with the teacher's parametrisation (epsilon prediction, the teacher's time
  input: ``time_input`` as in :class:`~shortcut_policy.objectives.diffusion.Diffusion`), so it starts from the
  teacher's weights (``distill``'s ``init_from_teacher``). One step reads the noise z as x_kg at the generator step
  ``generator_step`` kg and returns the data estimate
  x = (z - sqrt(1 - abar_kg) eps(z, kg)) / sqrt(abar_kg). DMD uses the last step (999 of 1,000); with Diffusion
  Policy's 100-step squaredcos schedule abar_99 = 2.4e-7 amplifies the net's error 2,000-fold, so the default is
  kg = 70 (abar = 0.20), the best on validation seeds of kg = 50/60/70/80/90 for a Push-T student with 10 % of its
  DDPM teacher's steps (test success 0.295 against 0.08 at kg = 90; docs/results/pusht_policies_b256.md).
- The fake denoiser is a copy of the policy's net (:meth:`bind_net`), initialised from the frozen teacher's weights
  on the first training step (DMD initialises it from the teacher too); its parameters belong to the objective, so
  the trainer's single AdamW optimiser updates both nets (the two losses touch disjoint parameters: the generator's
  loss sees the denoisers only under ``no_grad``, the fake loss sees G's samples detached), and checkpoints hold it,
  so a resumed run equals an uninterrupted one. ``fake_updates`` fake updates per generator update: 1 (DMD) updates
  both nets at every step; n > 1 (DMD2's two time-scale rule uses 5) trains only the fake denoiser on n - 1 of every
  n steps and both on the n-th (a step counter in the checkpoint keeps the cycle across a resume).
- Noise levels of the matching term: k uniform in [``k_min``, ``k_max``] (DMD's 0.02 K .. 0.98 K); of the fake
  denoiser's loss: uniform in 0 .. K - 1 (the DDPM loss).
- Paired regression (DMD's L_reg, its weight 0.25 with LPIPS on images; here the MSE in normalised action units):
  on every generator update the first ``regression_fraction`` of the rows also regress G(z) onto the teacher's
  deterministic DDIM sample from the same noise z and observation, ``regression_steps`` steps, computed on the fly
  (DMD precomputes a dataset of such pairs; on the fly the pairs never repeat and a resumed run draws the same
  noise), loss ``regression_weight`` x MSE. It anchors the generator to the teacher's noise-to-action map, which
  DMD found to prevent mode dropping; its cost is ``regression_steps`` teacher passes over those rows.

The teacher must be a DDPM/epsilon checkpoint with the same noise schedule and time input (``time_input``); anything
else is refused before training. Sampling: exactly one step.
"""

from __future__ import annotations

import copy

import torch

from ..conventions import M
from ..utils import check_int
from .base import Objective
from .diffusion import Diffusion
from .distillation import FrozenTeacher, _TeacherObjective


class ScoreDistillation(_TeacherObjective):
    """DMD / OneDP one-step distillation from a frozen DDPM teacher (module docstring).

    Shapes: x1 (B, H, Da) normalised actions (only its shape and device are used: the targets come from the
    teacher); cond (B, Dc). The policy's net is the generator: net(x (B, H, Da), k (B,) float DDPM step, level (B,),
    cond) -> epsilon. Raises ``ValueError`` for options out of range."""

    name = "score_distillation"

    def __init__(
        self,
        m: int = M,
        teacher_checkpoint: str | None = None,
        teacher: str = "ema",
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        generator_step: int = 70,
        k_min: int = 2,
        k_max: int = 97,
        time_input: str = "step",
        fake_updates: int = 1,
        regression_weight: float = 0.0,
        regression_fraction: float = 0.25,
        regression_steps: int = 10,
    ):
        super().__init__(m, teacher_checkpoint, teacher)
        # the teacher's noise schedule and time input (validated there); it holds no state of its own
        self.diffusion = Diffusion(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            time_input=time_input,
        )
        self.time_input, self.K = time_input, self.diffusion.K
        for key, val in (("generator_step", generator_step), ("k_min", k_min), ("k_max", k_max)):
            if isinstance(val, bool) or int(val) != val or not 0 <= int(val) < self.K:
                raise ValueError(f"objective.{key}={val!r}: expected an integer DDPM step in 0..{self.K - 1}")
        if k_min > k_max:
            raise ValueError(f"objective.k_min={k_min} > objective.k_max={k_max}")
        self.generator_step, self.k_min, self.k_max = int(generator_step), int(k_min), int(k_max)
        if isinstance(fake_updates, bool) or int(fake_updates) != fake_updates or int(fake_updates) < 1:
            raise ValueError(f"objective.fake_updates={fake_updates!r}: expected an integer >= 1")
        self.fake_updates = int(fake_updates)
        if not float(regression_weight) >= 0.0:
            raise ValueError(f"objective.regression_weight={regression_weight!r}: expected a weight >= 0 (0 = off)")
        if not 0.0 < float(regression_fraction) <= 1.0:
            raise ValueError(
                f"objective.regression_fraction={regression_fraction!r}: expected the share of rows in (0, 1]"
            )
        self.regression_weight, self.regression_fraction = float(regression_weight), float(regression_fraction)
        self.regression_steps = check_int("objective.regression_steps", regression_steps, 1)
        self.register_buffer("fake_initialised", torch.zeros((), dtype=torch.long))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))  # training calls (resumed exactly)
        self.fake = None

    @property
    def net_time_scale(self) -> float | None:
        """The teacher's (:attr:`Diffusion.net_time_scale`), so that the nets have its shape and time embedding."""
        return self.diffusion.net_time_scale

    def net_t(self, k: torch.Tensor) -> torch.Tensor:
        """The nets' time input for DDPM steps k (B,), as the teacher reads it (:meth:`Diffusion.net_t`)."""
        return self.diffusion.net_t(k)

    # --- the second net -----------------------------------------------------------------------------------
    def bind_net(self, net) -> None:
        """Create the fake denoiser as a copy of the policy's net (called by the model builder before the optimiser
        exists, so its parameters are trained and checkpointed with the model)."""
        self.fake = copy.deepcopy(net)

    def _abar(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.diffusion.ddpm.alphas_cumprod.to(like.device, torch.float32)[k].to(like.dtype)
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def check_teacher(self, teacher_objective: Objective, where: str) -> None:
        """Refuse a teacher that is not a DDPM epsilon-prediction checkpoint with this objective's noise schedule and
        time input. Raises ``ValueError`` naming ``where``."""
        if getattr(teacher_objective, "name", "") != "diffusion":
            raise ValueError(
                f"{where}: objective=score_distillation needs a DDPM teacher (objective=diffusion); this checkpoint "
                f"was trained with objective={getattr(teacher_objective, 'name', '?')}"
            )
        if teacher_objective.prediction_type != "epsilon":
            raise ValueError(
                f"{where}: objective=score_distillation needs an epsilon-prediction teacher; it has "
                f"prediction_type={teacher_objective.prediction_type!r}"
            )
        if teacher_objective.time_input != self.time_input:
            raise ValueError(
                f"{where}: the teacher's time input is {teacher_objective.time_input!r}, this objective's "
                f"{self.time_input!r}: set objective.time_input={teacher_objective.time_input} (the student and the "
                "fake denoiser start from the teacher's weights and must read time as it does)"
            )
        theirs, mine = teacher_objective.ddpm.alphas_cumprod, self.diffusion.ddpm.alphas_cumprod
        if theirs.shape != mine.shape or not torch.allclose(theirs, mine):
            raise ValueError(
                f"{where}: the teacher's noise schedule ({theirs.numel()} steps) differs from "
                f"objective.num_train_timesteps / beta_schedule ({self.K} steps); set them to the teacher's"
            )

    # --- generator ----------------------------------------------------------------------------------------
    def generate(self, net, z: torch.Tensor, cond) -> torch.Tensor:
        """One generator step: noise z (B, ...) read as x_kg -> data estimate (B, ...), unclipped, differentiable."""
        kg = torch.full((z.shape[0],), self.generator_step, device=z.device, dtype=torch.long)
        a = self._abar(kg, z)
        eps = net(z, self.net_t(kg).to(z.dtype), torch.full_like(kg, self.log2_m, dtype=z.dtype), cond)
        return (z - (1.0 - a).sqrt() * eps) / a.sqrt()

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None, frozen=None):
        """(loss, info): the DMD surrogate for the generator ``net`` plus the fake denoiser's DDPM loss on the
        generator's detached samples (module docstring). ``frozen``: the teacher
        (:class:`~shortcut_policy.objectives.distillation.FrozenTeacher`); raises ``ValueError`` without it or
        without :meth:`bind_net`."""
        self.check_data(x1)
        if frozen is None:
            raise ValueError(
                "objective=score_distillation needs a trained DDPM teacher: run `shortcut-policy distill "
                "teacher=PATH objective=score_distillation` (or set objective.teacher_checkpoint=PATH)"
            )
        if self.fake is None:
            raise ValueError(
                "objective=score_distillation: bind_net(net) was not called (the fake denoiser is missing)"
            )
        if not bool(self.fake_initialised):
            self.fake.load_state_dict(frozen.net.state_dict())
            self.fake_initialised.fill_(1)
        B = x1.shape[0]
        z = torch.randn_like(x1) if x0 is None else x0
        # two time-scale updates (DMD2): of every `fake_updates` training steps only the last moves the generator
        gen_step = int(self.step_count) % self.fake_updates == self.fake_updates - 1
        if torch.is_grad_enabled():
            self.step_count += 1
        level = torch.full((B,), float(self.log2_m), device=x1.device, dtype=x1.dtype)
        fcond = None if cond is None else cond.detach()
        if not gen_step:
            with torch.no_grad():
                x = self.generate(net, z, cond)
            loss_fake = self._fake_loss(x, level, fcond)
            return self.check_loss(loss_fake), {"loss": loss_fake.item(), "loss_fake": loss_fake.item()}
        x = self.generate(net, z, cond)
        # distribution matching: both denoisers at a random noise level of the generated sample
        k = torch.randint(self.k_min, self.k_max + 1, (B,), device=x1.device)
        a = self._abar(k, x)
        with torch.no_grad():
            xk = a.sqrt() * x + (1.0 - a).sqrt() * torch.randn_like(x)
            t_k = self.net_t(k).to(x.dtype)
            eps_real = frozen.net(xk, t_k, level, frozen.cond)
            eps_fake = self.fake(xk, t_k, level, fcond)
            p_real = (xk - (1.0 - a).sqrt() * eps_real) / a.sqrt()
            p_fake = (xk - (1.0 - a).sqrt() * eps_fake) / a.sqrt()
            norm = (x - p_real).abs().flatten(1).mean(1).clamp_min(1e-6).reshape(-1, *([1] * (x.dim() - 1)))
            grad = (p_fake - p_real) / norm
            target = x - grad
        loss_dmd = 0.5 * self.row_mse(x, target).mean()
        loss_gen, info = loss_dmd, {}
        if self.regression_weight > 0.0:
            loss_reg = self._regression_loss(x, z, frozen)
            loss_gen = loss_dmd + self.regression_weight * loss_reg
            info["loss_regression"] = loss_reg.item()
        loss_fake = self._fake_loss(x.detach(), level, fcond)
        loss = self.check_loss(loss_gen + loss_fake)
        return loss, {
            "loss": loss.item(),
            "loss_dmd": loss_dmd.item(),
            "loss_fake": loss_fake.item(),
            "score_gap": grad.float().pow(2).mean().sqrt().item(),
            **info,
        }

    def _regression_loss(self, x: torch.Tensor, z: torch.Tensor, frozen) -> torch.Tensor:
        """DMD's paired regression: MSE between the generator's samples x[:r] (B, ...) and the teacher's
        ``regression_steps``-step DDIM samples from the same noise z[:r] and observations, r =
        max(1, round(B x regression_fraction)) (module docstring)."""
        r = max(1, int(round(x.shape[0] * self.regression_fraction)))
        cond = None if frozen.cond is None else frozen.cond[:r]
        with torch.no_grad():
            ref = FrozenTeacher(frozen.net, cond, frozen.objective).sample(z[:r], self.regression_steps)
        return self.row_mse(x[:r], ref.to(x.dtype)).mean()

    def _fake_loss(self, x: torch.Tensor, level: torch.Tensor, cond) -> torch.Tensor:
        """The fake denoiser's DDPM epsilon loss on generated samples x (B, ...) (detached), k uniform in 0..K-1."""
        k = torch.randint(0, self.K, (x.shape[0],), device=x.device)
        a = self._abar(k, x)
        n = torch.randn_like(x)
        xk = a.sqrt() * x + (1.0 - a).sqrt() * n
        return self.row_mse(self.fake(xk, self.net_t(k).to(x.dtype), level, cond), n).mean()

    def check_steps(self, steps) -> int:
        """Only one step is defined for this objective; raises ``ValueError`` otherwise."""
        if int(steps) != 1:
            raise ValueError(f"steps={steps}: objective=score_distillation samples in exactly 1 step")
        return 1

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int = 1, null_cond=None, cfg_scale=None):
        """One generator step from noise x0 (B, ...) (the caller clamps to [-1, 1])."""
        self.check_steps(steps)
        return self.generate(net, x0, cond)
