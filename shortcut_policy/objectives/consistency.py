"""Consistency training: the shortcut paper's `consistency` baseline (kvfrans/shortcut-models,
baselines/targets_consistency_training.py, and the re-noising sampler of helper_inference.py:120-123).

Reference behaviour (file:line of targets_consistency_training.py at commit 6010043), in this project's convention
(t = 0 noise, t = 1 data, x_t = (1-(1-eps)t) x0 + t x1):

- L10-12 step schedule: ONE step level for the whole batch, growing with training progress,
  ``dt_base = floor(step / (max_steps / log2(M)))``, d = 2^-dt_base. Levels run 0 (d = 1) .. log2(M)-1 during
  training (M = 128: 0..6).
- L16-18: t = randint(0, 2^dt_base) / 2^dt_base, a multiple of d in [0, 1 - d]; t2 = t + d.
- L24-27: x_t and x_t2 on the interpolant with the SAME noise pair (x0, x1).
- L29-31 target: the teacher (the EMA model, `call_model_ema`) predicts a velocity at (x_t2, t2); its data estimate
  is ``x1_hat = x_t2 + (1 - t2) * v_teacher`` and the target velocity is ``v_target = (x1_hat - x_t) / (1 - t)``:
  the velocity that carries x_t straight to the teacher's x1 estimate. No gradient flows through it (the
  reference builds targets outside `loss_fn`). At t2 = 1 the estimate is x_t2 itself (the data point).
- train.py:140: the model ignores dt (``ignore_dt``); here every call passes the constant flow-matching level
  log2(M), as FlowMatching does, so the same nets serve (the step-size branch then gets no useful signal).
- Loss: one unweighted MSE between net(x_t, t) and v_target (train.py:237-239).
- Sampling (helper_inference.py:100-123): at t = i/N, predict v = net(x, t); ``x1_hat = x + (1 - t) v``; re-noise to
  the next time with FRESH noise, ``x = x1_hat (t + 1/N) + eps (1 - t - 1/N)`` (the plain linear interpolant,
  as the reference; the last step returns x1_hat). One step is one jump x0 -> x1_hat.

Deviations and mechanisms (documented here, configurable where a choice exists):

- The step counter. `loss()` does not receive the trainer's step, and the trainer is objective-agnostic, so the
  schedule reads, in this order:
    1. ``objective.progress`` (a float in [0, 1], None by default): set it directly, or call
       ``objective.set_progress(step, total_steps)``; a caller that knows the step (a custom loop) uses this.
    2. otherwise an internal counter ``objective.step_count`` of `loss()` calls made with gradients enabled
       (validation or no-grad calls do not advance it), read BEFORE the call's increment so the first call is step
       0 like the reference's ``train_state.step``; the schedule length is the config's ``total_steps`` (the
       config default is ``${train.num_steps}``). The counter is a persistent buffer (``objective.step_count`` in
       the model's state dict): it is saved in checkpoints, so a resumed run continues the schedule. The resolved
       ``objective.total_steps`` is an objective setting, so the trainer refuses a resume that changes
       ``train.num_steps`` unless ``objective.total_steps`` is pinned to the checkpoint's value (the schedule then
       keeps its length). The counter is also restored by ``train.init_weights``: a fine-tuning run continues the
       schedule of its checkpoint (past its end: the last level).
  ``total_steps=None`` with no ``progress`` set raises ValueError at the first `loss()`.
- Past the end of the schedule (counter >= total_steps, or progress >= 1) the level stays at log2(M)-1 (the
  reference's last level; its formula would move on to log2(M), ... after max_steps, which it never trains).
- ``teacher``: "ema" (reference) or "online" (the trainer then passes the online net as `teacher`).
- ``class_dropout_prob`` (default 0, the reference has no class dropout here): when > 0 the SAME rows are dropped
  for the student and the teacher (so the target and the prediction share the condition). ``cfg_scale`` is used
  only by `sample` (guided velocity through the shared `guided` helper).
- The noise pair is drawn per row with no reuse between parts (the reference has one part only, so nothing differs).
"""

from __future__ import annotations

import math

import torch

from ..conventions import M, interpolate
from .base import Objective
from .guidance import guided, null_like


class ConsistencyTraining(Objective):
    """Consistency training with a scheduled step level (see the module docstring for the reference mapping).

    Shapes: x1 (B, ...) normalised data; cond (B, Dc) features, (B,) labels or None; x0 (B, ...) noise like x1.
    The net is called as net(x_t (B, ...), t (B,), level (B,) = log2(M), cond) and returns a velocity like x_t.
    """

    name = "consistency"
    takes_generator = True
    uses_step_size = False

    def __init__(
        self,
        m: int = M,
        total_steps: int | None = None,
        teacher: str = "ema",
        class_dropout_prob: float = 0.0,
        cfg_scale: float | None = None,
    ):
        super().__init__(m)
        if self.log2_m < 1:
            raise ValueError(f"objective.m={m}: consistency training needs M >= 2 (at least one level below log2 M)")
        if total_steps is not None and (
            isinstance(total_steps, bool) or int(total_steps) != total_steps or int(total_steps) < 1
        ):
            raise ValueError(
                f"objective.total_steps={total_steps!r}: expected a positive integer (the length of the "
                "step-level schedule, normally ${train.num_steps}) or null"
            )
        if teacher not in ("ema", "online"):
            raise ValueError(f"objective.teacher={teacher!r}: expected 'ema' (reference) or 'online'")
        if not 0.0 <= float(class_dropout_prob) <= 1.0:
            raise ValueError(f"objective.class_dropout_prob={class_dropout_prob}: expected a probability in [0, 1]")
        self.total_steps = None if total_steps is None else int(total_steps)
        self.teacher = teacher  # read by Trainer.teacher(): which model is passed as `teacher` to loss()
        self.class_dropout_prob, self.cfg_scale = float(class_dropout_prob), cfg_scale
        self.progress: float | None = None  # set by a caller that knows the training step (overrides the counter)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))  # loss() calls with grad enabled

    # --- schedule ---------------------------------------------------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        """Drive the schedule from an external step counter: progress = step / total_steps (in [0, 1])."""
        if int(total_steps) < 1 or int(step) < 0:
            raise ValueError(f"set_progress(step={step}, total_steps={total_steps}): expected step >= 0, total >= 1")
        self.progress = min(1.0, int(step) / int(total_steps))

    def current_level(self) -> int:
        """The step level k (d = 2^-k) for the next loss() call: floor(progress * log2 M), capped at log2(M)-1."""
        top = self.log2_m - 1
        if self.progress is not None:
            p = float(self.progress)
            if not 0.0 <= p <= 1.0 or math.isnan(p):
                raise ValueError(f"objective.progress={self.progress!r}: expected a value in [0, 1]")
            return min(int(math.floor(p * self.log2_m + 1e-9)), top)
        if self.total_steps is None:
            raise ValueError(
                "objective=consistency: its step-level schedule needs objective.total_steps (the number "
                "of training steps, e.g. ${train.num_steps}) or a caller that sets objective.progress "
                "(set_progress(step, total_steps))"
            )
        # integer arithmetic: floor(step / (total / log2 M)) exactly
        return min(int(self.step_count) * self.log2_m // self.total_steps, top)

    # --- targets ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, teacher, x0, x1, t, d, cond=None):
        """(x_t, v_target) for noise x0 and data x1 (B, ...), times t (B,) and step sizes d (B,).

        x_t2 = interpolant at t2 = t + d (same x0, x1); x1_hat = x_t2 + (1 - t2) teacher(x_t2, t2, log2 M, cond);
        v_target = (x1_hat - x_t) / (1 - t)   (targets_consistency_training.py:26-31). No gradient.
        """
        shape = (-1, *([1] * (x1.dim() - 1)))
        t2 = t + d
        x_t, x_t2 = interpolate(x0, x1, t), interpolate(x0, x1, t2)
        level = torch.full_like(t, float(self.log2_m))
        v2 = teacher(x_t2, t2, level, cond)
        x1_hat = x_t2 + (1.0 - t2).reshape(shape) * v2
        return x_t, ((x1_hat - x_t) / (1.0 - t).reshape(shape)).to(x1.dtype)

    def loss(self, net, x1, cond=None, *, teacher=None, null_cond=None, x0=None, teacher_cond=None):
        """(loss, info) on a batch x1 (B, ...): MSE(net(x_t, t, log2 M, cond), v_target) at this call's level."""
        self.check_data(x1)
        B, dev = x1.shape[0], x1.device
        k = self.current_level()
        if torch.is_grad_enabled():
            self.step_count += 1
        teacher = net if teacher is None else teacher
        x0 = torch.randn_like(x1) if x0 is None else x0
        n_cells = 2**k
        t = torch.randint(0, n_cells, (B,), device=dev).to(x1.dtype) / n_cells
        d = torch.full_like(t, 1.0 / n_cells)
        tcond = cond if teacher_cond is None else teacher_cond
        if cond is not None and null_cond is not None and self.class_dropout_prob > 0:
            drop = (torch.rand(B, device=dev) < self.class_dropout_prob).reshape(-1, *([1] * (cond.dim() - 1)))
            cond = torch.where(drop, null_like(cond, null_cond), cond)
            tcond = torch.where(drop, null_like(tcond, null_cond), tcond)
        x_t, target = self.targets(teacher, x0, x1, t, d, tcond)
        pred = net(x_t, t, torch.full_like(t, float(self.log2_m)), cond)
        rows = self.row_mse(pred, target)
        loss = self.check_loss(rows.mean())
        return loss, {
            "loss": loss.item(),
            "level": float(k),
            "step_size": 1.0 / n_cells,
            "v_magnitude_target": target.float().pow(2).mean().sqrt().item(),
        }

    # --- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, net, x0, cond=None, *, steps: int, null_cond=None, cfg_scale=None, generator=None):
        """N re-noising steps from noise x0 (B, ...): at t = i/N, x1_hat = x + (1 - t) v(x, t); then
        x = x1_hat (t + 1/N) + eps (1 - t - 1/N) with fresh eps ~ N(0, I) drawn from `generator` (a torch.Generator
        on x0's device, or None for the global RNG); the last step returns x1_hat (helper_inference.py:120-123)."""
        n = self.check_steps(steps)
        x, B = x0, x0.shape[0]
        level = torch.full((B,), float(self.log2_m), device=x.device, dtype=x.dtype)
        scale = self.cfg_scale if cfg_scale is None else cfg_scale
        shape = (-1, *([1] * (x.dim() - 1)))
        for i in range(n):
            t = torch.full((B,), i / n, device=x.device, dtype=x.dtype)
            x1_hat = x + (1.0 - t).reshape(shape) * guided(net, x, t, level, cond, null_cond, scale)
            t_next = (i + 1) / n
            if i == n - 1:
                x = x1_hat
            else:
                eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = x1_hat * t_next + eps * (1.0 - t_next)
        return x
