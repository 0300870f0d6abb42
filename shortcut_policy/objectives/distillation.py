"""Objectives that learn from a trained TEACHER checkpoint (``objective.teacher_checkpoint=PATH``).

Three distillation methods, side by side with the one-phase objectives:

- ``consistency_distillation``: the shortcut paper's baseline (kvfrans/shortcut-models,
  baselines/targets_consistency_distillation.py). Reference behaviour, in this project's convention (t = 0 noise,
  t = 1 data):
    * L11-16: t on the grid {k/M}, d = 1/M; the net always sees the flow-matching level log2(M) (train.py:140
      ``ignore_dt``).
    * L23-26: ONE Euler step of size 1/M with the frozen teacher (the loaded checkpoint's EMA weights):
      x_t2 = clip(x_t + v_teacher(x_t, t) / M, +-4), t2 = t + 1/M.
    * L27-29: the EMA *student* predicts the data at t2: x1_hat = x_t2 + (1 - t2) v_ema(x_t2, t2); target
      v = (x1_hat - x_t) / (1 - t). No gradient through the target.
    * Sampling: Euler with the level held at log2(M) (helper_inference.py: only `consistency` re-noises); one step
      is x0 + v(x0, 0).
- ``progressive``: progressive distillation as the reference runs it (baselines/targets_progressive.py, train.py:
  309-312). log2(M) stages of equal length; in stage s (0-based) every row trains step size d = 2^(s+1)/M
  (``dt_base = log2 M - s - 1``), t a multiple of d, and the target is the mean of two Euler half steps of the
  stage's teacher: v = (v1 + v2) / 2, v1 = T(x_t, t), v2 = T(clip(x_t + d/2 v1, +-4), t + d/2). Stage 0's teacher is
  the loaded checkpoint; at the start of each later stage the teacher becomes a copy of the student (its EMA weights
  with ``teacher=ema``, the reference's ``bootstrap_ema=1``). The net ignores d (level held at log2(M), train.py:140).
  After the last stage the student is a 1-step sampler (d = 1). ``cfg`` in the teacher of stage 0 is not
  implemented (the reference applies it only with ``bootstrap_cfg``; policies have no classes).
- ``ode_distillation``: one-step knowledge distillation onto the teacher's deterministic sampler (Luhman & Luhman
  2021, "Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed"): for noise z the
  teacher runs its own deterministic sampler (Euler for flow teachers, DDIM for a diffusion teacher, `teacher_steps`
  steps) to x_teacher(z); the student is trained so that one Euler step from z lands there:
  z + net(z, 0, level 0) = x_teacher(z), i.e. MSE(net(z, 0, 0, cond), x_teacher - z). It is the method here that
  accepts a DIFFUSION teacher (DDPM-trained, as Diffusion Policy), because it only needs the teacher's samples.
  Sampling: 1 step only.

How the teacher reaches the objective (shared by policies and images): the trainer builds a frozen copy of the
teacher model once (``Trainer.frozen_teacher``), the model's ``compute_loss`` wraps it into a :class:`FrozenTeacher`
(net, its own condition, its own objective) and passes it as ``frozen=``. ``teacher=`` stays what it is for every
objective (the EMA or online student, ``objective.teacher``). Progressive's teacher refresh is asked for by
:meth:`Progressive.teacher_refresh_due` and done by the trainer, which also saves the frozen teacher's weights in the
checkpoint so that a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conventions import CLIP_TARGET, M, interpolate
from ..utils import check_int
from .base import Objective
from .timesteps import discrete_t


@dataclass
class FrozenTeacher:
    """A trained teacher as the distillation objectives see it.

    net: the teacher's network, called net(x (B, ...), t (B,), step input (B,), cond) -> (B, ...) in the teacher's
    own parametrisation; cond: the teacher's condition for this batch (its own observation encoding); objective: the
    teacher's objective (its `sample` is the teacher's sampler; a flow-type objective makes `net` a velocity field).
    """

    net: object
    cond: object
    objective: Objective

    @property
    def is_flow(self) -> bool:
        """True when the teacher's net outputs a velocity on this project's interpolant (every objective but
        diffusion and regression)."""
        return getattr(self.objective, "name", "") not in ("diffusion", "regression")

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The teacher's velocity at its finest level: net(x, t, log2 M_teacher, cond). Raises ``ValueError`` for a
        teacher that has no velocity field (diffusion, regression)."""
        if not self.is_flow:
            raise ValueError(
                f"the teacher's objective is {self.objective.name!r}, which has no velocity field; this distillation "
                "needs a flow teacher (flow_matching or shortcut). For a diffusion teacher use "
                "objective=ode_distillation"
            )
        level = torch.full_like(t, float(self.objective.log2_m))
        return self.objective.velocity_net(self.net)(x, t, level, self.cond)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """The teacher's own sampler from noise z (B, ...) in `steps` steps (DDIM for a diffusion teacher, so the
        map z -> x is deterministic); returns x (B, ...) in normalised units."""
        obj = self.objective
        if getattr(obj, "name", "") == "diffusion":
            return obj.sample(self.net, z, self.cond, steps=steps, sampler="ddim")
        return obj.sample(self.net, z, self.cond, steps=steps)


def _check_teacher_checkpoint(name: str, path) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise ValueError(f"objective.teacher_checkpoint={path!r}: expected a checkpoint path (a .ckpt file)")
    return path


def _need_frozen(name: str, frozen) -> FrozenTeacher:
    if frozen is None:
        raise ValueError(
            f"objective={name} needs a trained teacher: set objective.teacher_checkpoint=PATH (a checkpoint of the "
            "same task), or run `shortcut-policy distill teacher=PATH objective=" + name + "`"
        )
    return frozen


class _TeacherObjective(Objective):
    """Base of the objectives that need ``objective.teacher_checkpoint``; the net ignores the step size."""

    needs_teacher_checkpoint = True
    uses_step_size = False

    def __init__(self, m: int, teacher_checkpoint: str | None, teacher: str):
        super().__init__(m)
        self.teacher_checkpoint = _check_teacher_checkpoint(self.name, teacher_checkpoint)
        if teacher not in ("ema", "online"):
            raise ValueError(f"objective.teacher={teacher!r}: expected 'ema' (reference) or 'online'")
        self.teacher = teacher

    def check_teacher(self, teacher_objective: Objective, where: str) -> None:
        """Refuse a teacher this method cannot learn from (called by the trainer before training starts).
        Raises ``ValueError`` naming ``where`` (the checkpoint)."""
        if getattr(teacher_objective, "name", "") in ("diffusion", "regression"):
            raise ValueError(
                f"{where}: objective={self.name} needs a flow teacher (flow_matching or shortcut); this checkpoint "
                f"was trained with objective={teacher_objective.name}. For a diffusion teacher use "
                "objective=ode_distillation"
            )

    def teacher_refresh_due(self) -> bool:
        """True when the trainer must copy the student into the frozen teacher before this step (progressive)."""
        return False

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None):
        """Euler integration from x0 (B, ...) in ``steps`` steps, the level input held at log2 M (the net ignores d,
        as the reference's ``ignore_dt``). Returns x at t = 1."""
        n = self.check_steps(steps)
        return self.euler(net, x0, cond, n, float(self.log2_m), null_cond, cfg_scale)


class ConsistencyDistillation(_TeacherObjective):
    """Consistency distillation from a frozen flow teacher (module docstring: reference mapping).

    Shapes: x1 (B, ...) normalised data; cond (B, Dc) or labels; the net returns a velocity like x_t.
    """

    name = "consistency_distillation"

    def __init__(
        self, m: int = M, teacher_checkpoint: str | None = None, teacher: str = "ema", clip: float | None = CLIP_TARGET
    ):
        super().__init__(m, teacher_checkpoint, teacher)
        self.clip = clip

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None, frozen=None):
        """(loss, info): MSE(net(x_t, t, log2 M, cond), (x1_hat - x_t) / (1 - t)), x1_hat from one frozen-teacher
        Euler step of 1/M and the EMA student's data estimate at t + 1/M (no gradient through the target)."""
        self.check_data(x1)
        frozen = _need_frozen(self.name, frozen)
        B, shape = x1.shape[0], (-1, *([1] * (x1.dim() - 1)))
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = discrete_t(B, self.m, x1.device).to(x1.dtype)
        level = torch.full_like(t, float(self.log2_m))
        x_t = interpolate(x0, x1, t)
        student = net if teacher is None else teacher
        scond = cond if teacher_cond is None else teacher_cond
        with torch.no_grad():
            d = 1.0 / self.m
            x_t2 = x_t + d * frozen.velocity(x_t, t)
            if self.clip is not None:
                x_t2 = x_t2.clamp(-self.clip, self.clip)
            t2 = t + d
            x1_hat = x_t2 + (1.0 - t2).reshape(shape) * student(x_t2, t2, level, scond)
            target = ((x1_hat - x_t) / (1.0 - t).reshape(shape)).to(x1.dtype)
        pred = net(x_t, t, level, cond)
        loss = self.check_loss(self.row_mse(pred, target).mean())
        return loss, {"loss": loss.item(), "v_magnitude_target": target.float().pow(2).mean().sqrt().item()}


class Progressive(_TeacherObjective):
    """Progressive distillation in log2(M) stages inside one run (module docstring: reference mapping).

    The stage follows the number of training steps: stage = floor(step * log2 M / total_steps), capped at
    log2(M) - 1. The step counter is a persistent buffer (``step_count``, saved in checkpoints) as in
    :class:`~shortcut_policy.objectives.consistency.ConsistencyTraining`; ``teacher_stage`` records which stage's
    teacher the trainer's frozen copy holds.
    """

    name = "progressive"

    def __init__(
        self,
        m: int = M,
        teacher_checkpoint: str | None = None,
        total_steps: int | None = None,
        teacher: str = "ema",
        clip: float | None = CLIP_TARGET,
    ):
        super().__init__(m, teacher_checkpoint, teacher)
        if self.log2_m < 1:
            raise ValueError(f"objective.m={m}: progressive distillation needs M >= 2")
        self.total_steps = None if total_steps is None else check_int("objective.total_steps", total_steps, 1)
        self.clip = clip
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("teacher_stage", torch.zeros((), dtype=torch.long))

    def current_stage(self) -> int:
        """The stage s (0-based) of the next loss() call: floor(step_count * log2 M / total_steps), at most
        log2(M) - 1. Raises ``ValueError`` without ``total_steps``."""
        if self.total_steps is None:
            raise ValueError(
                "objective=progressive: its stage schedule needs objective.total_steps (the number of "
                "training steps, normally ${train.num_steps})"
            )
        return min(int(self.step_count) * self.log2_m // self.total_steps, self.log2_m - 1)

    def teacher_refresh_due(self) -> bool:
        """True when the next step starts a new stage: the frozen teacher must become a copy of the student."""
        return self.current_stage() > int(self.teacher_stage)

    def mark_refreshed(self) -> None:
        """Record that the frozen teacher now holds the current stage's teacher."""
        self.teacher_stage.fill_(self.current_stage())

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None, frozen=None):
        """(loss, info): MSE(net(x_t, t, log2 M, cond), (v1 + v2) / 2), the two half steps of the stage's frozen
        teacher at step size d = 2^(s+1)/M, t a multiple of d."""
        self.check_data(x1)
        frozen = _need_frozen(self.name, frozen)
        s = self.current_stage()
        if torch.is_grad_enabled():
            self.step_count += 1
        B = x1.shape[0]
        n_cells = self.m // 2 ** (s + 1)  # d = 1 / n_cells
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = torch.randint(0, n_cells, (B,), device=x1.device).to(x1.dtype) / n_cells
        d = 1.0 / n_cells
        x_t = interpolate(x0, x1, t)
        with torch.no_grad():
            v1 = frozen.velocity(x_t, t)
            x_mid = x_t + (d / 2) * v1
            if self.clip is not None:
                x_mid = x_mid.clamp(-self.clip, self.clip)
            v2 = frozen.velocity(x_mid, t + d / 2)
            target = ((v1 + v2) / 2).to(x1.dtype)
        pred = net(x_t, t, torch.full_like(t, float(self.log2_m)), cond)
        loss = self.check_loss(self.row_mse(pred, target).mean())
        return loss, {"loss": loss.item(), "stage": float(s), "step_size": d}


class OdeDistillation(_TeacherObjective):
    """One-step distillation onto the teacher's deterministic sampler (module docstring).

    The net is called as net(z, 0, level 0 (d = 1), cond) and returns the displacement x_teacher(z) - z; a 1-step
    sample is z + net(z, 0, 0, cond). Only ``steps=1`` samples.
    """

    name = "ode_distillation"

    def __init__(
        self, m: int = M, teacher_checkpoint: str | None = None, teacher_steps: int = 10, teacher: str = "ema"
    ):
        super().__init__(m, teacher_checkpoint, teacher)
        self.teacher_steps = check_int("objective.teacher_steps", teacher_steps, 1)

    def check_teacher(self, teacher_objective: Objective, where: str) -> None:
        """Any teacher with a sampler works (flow, shortcut, diffusion via DDIM); regression is refused (it has no
        noise to map from)."""
        if getattr(teacher_objective, "name", "") == "regression":
            raise ValueError(f"{where}: objective=ode_distillation needs a generative teacher, not regression")
        teacher_objective.check_steps(self.teacher_steps)

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None, frozen=None):
        """(loss, info): MSE(net(z, 0, 0, cond), x_teacher(z) - z) with x_teacher the teacher's `teacher_steps`-step
        deterministic sample from the same noise z (B, ...) and the teacher's own condition. x1 only fixes the
        shape (the targets are the teacher's samples, not the data)."""
        self.check_data(x1)
        frozen = _need_frozen(self.name, frozen)
        z = torch.randn_like(x1) if x0 is None else x0
        with torch.no_grad():
            target = (frozen.sample(z, self.teacher_steps) - z).to(x1.dtype)
        t = torch.zeros(x1.shape[0], device=x1.device, dtype=x1.dtype)
        pred = net(z, t, torch.zeros_like(t), cond)
        loss = self.check_loss(self.row_mse(pred, target).mean())
        return loss, {"loss": loss.item()}

    def check_steps(self, steps) -> int:
        """Only one step is defined for this objective; raises ``ValueError`` otherwise."""
        n = int(steps)
        if n != 1:
            raise ValueError(f"steps={steps}: objective=ode_distillation samples in exactly 1 step")
        return 1

    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int = 1, null_cond=None, cfg_scale=None):
        """One step: x0 + net(x0, 0, 0, cond) for noise x0 (B, ...)."""
        self.check_steps(steps)
        t = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
        return x0 + net(x0, t, torch.zeros_like(t), cond)
