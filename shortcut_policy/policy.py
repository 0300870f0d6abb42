"""One Policy class for every objective and observation type.

Policy(net, objective, obs_encoder, normalizer, horizon, n_obs_steps, n_action_steps, action_dim):
- compute_loss(batch): normalise, encode the first To observation steps into the global condition, and
  hand the normalised action window to the objective (shortcut | flow_matching | diffusion).
- predict_action(obs, steps=N): obs is a dict of (B, To, ...) arrays; samples a horizon of actions in
  N steps, clamps to [-1, 1] (the DDPM clip_sample equivalent), unnormalises, and returns the Ta actions to
  execute, action_pred[:, To-1 : To-1+Ta], as Diffusion Policy.

build_policy(cfg, normalizer) / load_policy(checkpoint) construct one from a config or a checkpoint; datasets,
the training bundle and the rollout evaluator are built in :mod:`shortcut_policy.builders`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from .checkpoint import load_checkpoint
from .conventions import interpolate
from .datasets.normalizer import LinearNormalizer
from .model import TrainableModel
from .nets import build_net
from .nets.obs_encoders import ObsEncoder
from .objectives import build_objective
from .objectives.distillation import FrozenTeacher
from .utils import all_finite, to_plain


def _shape_str(s):
    """A shape as "(2, 16, 10)" for error messages."""
    return "(" + ", ".join(str(int(v)) for v in s) + ")"


class Policy(TrainableModel):
    """A visuomotor policy in Diffusion Policy's receding-horizon form, trained with any objective.

    ``net(x (B, H, Da), t, level, cond (B, Dc))`` predicts the action window; ``obs_encoder`` maps the first To
    normalised observation steps to ``cond``; ``normalizer`` maps observations and actions to [-1, 1] (normalised
    units) and back. A window holds ``horizon`` (H) actions starting at the first observation step; the policy
    executes ``n_action_steps`` (Ta) of them starting at step To - 1. Raises ``ValueError`` when
    To - 1 + Ta > H."""

    def __init__(
        self,
        net: nn.Module,
        objective,
        obs_encoder: ObsEncoder,
        normalizer,
        *,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        action_dim: int,
        default_steps: int = 1,
        task_name: str = "",
    ):
        super().__init__()
        self.net, self.objective, self.obs_encoder, self.normalizer = net, objective, obs_encoder, normalizer
        self.horizon, self.n_obs_steps, self.n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        self.action_dim, self.default_steps, self.task_name = int(action_dim), int(default_steps), task_name
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps} exceeds "
                f"horizon {self.horizon}"
            )
        self.task_cfg = None  # set by load_policy / build: the runner evaluates on it
        self.noise_scale = 1.0  # initial-noise temperature of predict_action (eval `noise_scale=`); 1.0 = as trained
        self.warm_start = None  # tau of predict_chunk(prior=) (eval `warm_start=`); None = every chunk from noise
        self.first_chunk_steps = None  # with a warm start: sampling steps of an episode's first chunk (None = steps)

    def set_execution_horizon(self, n: int, what: str = "n_action_steps") -> None:
        """Execute ``n`` actions of each predicted chunk (the action horizon Ta) instead of the trained one. Raises
        ``ValueError`` naming ``what`` (the caller's config key) when n < 1 or when the chunk of ``horizon`` steps,
        read from step To - 1, holds fewer than n actions."""
        room = self.horizon - self.n_obs_steps + 1
        if isinstance(n, bool) or int(n) != n or n < 1 or n > room:
            raise ValueError(
                f"{what}={n!r}: the policy predicts horizon {self.horizon} with n_obs_steps {self.n_obs_steps}, so "
                f"1 to {room} actions per chunk can be executed"
            )
        self.n_action_steps = int(n)

    @property
    def device(self):
        return next(self.parameters()).device

    # --- checks -----------------------------------------------------------------------------------------
    def _check_obs(self, obs: Mapping, min_steps: int, where: str) -> None:
        """Validate an observation dict: every key the encoder needs present, shaped (B, T >= ``min_steps``,
        *obs_shape), finite. Raises ``TypeError`` / ``KeyError`` / ``ValueError`` naming ``where`` and the key."""
        if not isinstance(obs, Mapping):
            raise TypeError(f"{where}: observations must be a dict of arrays, got {type(obs).__name__}")
        need = self.obs_encoder.lowdim_keys + self.obs_encoder.image_keys
        missing = [k for k in need if k not in obs]
        if missing:
            raise KeyError(
                f"{where}: observation keys {missing} missing (got {sorted(obs)}; the policy expects {need})"
            )
        for k in need:
            x = obs[k]
            want = self.obs_encoder.obs_shapes[k]
            if tuple(x.shape[2:]) != want or x.ndim != 2 + len(want) or x.shape[1] < min_steps:
                raise ValueError(
                    f"{where}: observation {k!r} has shape {_shape_str(x.shape)}; expected "
                    f"(B, T>={min_steps}, {', '.join(map(str, want))})"
                )
            if not all_finite(torch.as_tensor(x, dtype=torch.float32)):
                raise ValueError(f"{where}: observation {k!r} contains NaN or inf")

    # --- training ---------------------------------------------------------------------------------------
    def compute_loss(self, batch, teacher: "Policy | None" = None, frozen: "Policy | None" = None):
        """Training loss on ``batch`` = {"obs": {key: (B, T, ...)}, "action": (B, H, Da)} in environment units:
        normalise, encode the first To observation steps, and call the objective on the normalised actions. A separate
        ``teacher`` policy (the EMA copy) encodes the observations for its own net. Raises ``ValueError`` for a wrong
        action shape or non-finite values. A ``frozen`` trained teacher policy (distillation objectives,
        ``objective.teacher_checkpoint``) reaches the objective as a
        :class:`~shortcut_policy.objectives.distillation.FrozenTeacher` with its own observation encoding.
        Returns ``(loss, info)``."""
        obs, action = batch["obs"], batch["action"]
        self._check_obs(obs, self.n_obs_steps, "batch")
        if action.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(
                f"batch: action has shape {_shape_str(action.shape)}; expected (B, {self.horizon}, "
                f"{self.action_dim}) (horizon, action_dim of the config)"
            )
        if not all_finite(action):
            raise ValueError("batch: action contains NaN or inf")
        nobs = self.normalizer.normalize({k: obs[k] for k in self.obs_encoder.obs_shapes if k in obs})
        naction = self.normalizer.normalize({"action": action})["action"]
        cond = self.obs_encoder(nobs)
        if teacher is None or teacher is self:
            t_net, t_cond = self.net, None
        else:
            t_net = teacher.net
            with torch.no_grad():
                t_cond = teacher.obs_encoder(nobs)
        if frozen is None:
            return self.objective.loss(self.net, naction, cond, teacher=t_net, teacher_cond=t_cond)
        with torch.no_grad():
            f_cond = frozen.obs_encoder(nobs)
        ft = FrozenTeacher(frozen.net, f_cond, frozen.objective)
        return self.objective.loss(self.net, naction, cond, teacher=t_net, teacher_cond=t_cond, frozen=ft)

    @classmethod
    def load_teacher(cls, path, like: "Policy") -> "Policy":
        """A trained policy to distil from (its EMA weights, :func:`load_policy`), checked against the student
        ``like``: same task, observation keys and shapes, horizon and action dimension. Raises ``ValueError``
        naming the checkpoint and what differs."""
        teacher = load_policy(path, expect_task=like.task_name or None)
        for what, a, b in (
            ("observation shapes", dict(teacher.obs_encoder.obs_shapes), dict(like.obs_encoder.obs_shapes)),
            ("horizon", teacher.horizon, like.horizon),
            ("action_dim", teacher.action_dim, like.action_dim),
        ):
            if a != b:
                raise ValueError(f"teacher checkpoint {path}: its {what} {a} differ from this run's {b}")
        return teacher

    # --- inference --------------------------------------------------------------------------------------
    def check_steps(self, steps):
        """Validate a sampling step count with the objective's rule (a power of two <= M for the flow objectives,
        1..K for diffusion); returns it as an int."""
        return self.objective.check_steps(steps)

    def reset(self) -> None:
        """The policy is stateless between calls (observation history is kept by the env wrapper)."""

    @torch.no_grad()
    def predict_action(
        self,
        obs: Mapping,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        return_numpy: bool = True,
        **sample_kw,
    ):
        """Actions to execute from observations ``obs`` = {key: (B, T >= To, ...)} (NumPy or torch, environment
        units; the last To steps are used).

        Samples a normalised window (B, H, Da) from noise (scaled by ``noise_scale``) in ``steps`` network evaluations
        (default ``default_steps``), clamps it to [-1, 1], unnormalises it and returns the Ta actions from step To - 1:
        (B, Ta, Da) as a NumPy array (``return_numpy``) or a tensor. ``generator`` seeds the noise (and the re-noising
        of DDPM / consistency samplers); ``sample_kw`` go to the objective's ``sample`` (e.g. ``sampler="ddim"``).
        :meth:`predict_chunk` also returns the whole normalised window and can warm-start from the previous one."""
        out, _ = self.predict_chunk(obs, steps, generator, return_numpy=return_numpy, **sample_kw)
        return out

    @torch.no_grad()
    def predict_chunk(
        self,
        obs: Mapping,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        prior: torch.Tensor | None = None,
        return_numpy: bool = True,
        **sample_kw,
    ):
        """:meth:`predict_action` that also returns the sampled window: ``(actions (B, Ta, Da), window (B, H, Da))``,
        the window normalised and clamped to [-1, 1] (a tensor), for :meth:`next_prior`.

        ``prior`` (B, H, Da), normalised: warm start (``warm_start`` = tau, set by eval ``warm_start=``): the
        sampler starts at t = tau from x_tau = (1 - (1 - eps) tau) x0 + tau prior (the flow interpolant between the
        noise and the prior, :func:`shortcut_policy.conventions.interpolate`) and takes ``steps`` steps of size
        (1 - tau) / steps to t = 1 (a DDPM policy enters its chain at the step of equal noise level:
        :class:`~shortcut_policy.objectives.diffusion.Diffusion`), so the NFE is unchanged. For a shortcut model
        every such step lies on its training grid (tau = 1/2 at 1 step: one jump of d = 1/2 from t = 1/2). Not in
        the shortcut paper or Diffusion Policy; it resembles SDEdit (Meng et al. 2022) applied to the previous
        chunk's unexecuted actions. Raises ``ValueError`` when ``prior`` is given without ``warm_start``, has the
        wrong shape, or the objective cannot start at tau."""
        steps = self.check_steps(self.default_steps if steps is None else steps)
        self._check_obs(obs, self.n_obs_steps, "predict_action")
        dev = self.device
        dtype = next(self.net.parameters()).dtype  # float32; float64 for a policy.double() reference (export parity)
        obs_t = {
            k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v, dtype=dtype, device=dev)[
                :, -self.n_obs_steps :
            ]
            for k, v in obs.items()
            if k in self.obs_encoder.obs_shapes
        }
        B = next(iter(obs_t.values())).shape[0]
        # noise_scale < 1 samples closer to the flow's mode (a temperature; 1.0 = the trained distribution)
        x0 = (torch.randn(B, self.horizon, self.action_dim, device=dev, generator=generator) * self.noise_scale).to(
            dtype
        )
        if self.objective.takes_generator:  # samplers that re-noise between steps draw from the same generator
            sample_kw.setdefault("generator", generator)
        if prior is not None:
            tau = self.check_warm_start(self.warm_start, steps)
            if tau is None:
                raise ValueError("predict_chunk(prior=...): set warm_start (eval warm_start=) to start from a prior")
            prior = torch.as_tensor(prior, dtype=dtype, device=dev)
            if tuple(prior.shape) != (B, self.horizon, self.action_dim):
                raise ValueError(
                    f"prior: expected shape {(B, self.horizon, self.action_dim)} (B, H, Da), got {tuple(prior.shape)}"
                )
            x0 = interpolate(x0, prior, torch.full((B,), tau, device=dev, dtype=dtype))
            sample_kw["t_start"] = tau
        window = self._sample_window(obs_t, x0, steps, **sample_kw)
        out = self._execute(window)
        return (out.cpu().numpy() if return_numpy else out), window

    def check_warm_start(self, tau, steps: int = 1) -> float | None:
        """Validate a warm-start time tau for ``steps``-step sampling: None (off) or a value the objective can start
        from (:meth:`Objective.check_t_start`: 1 - 2^-j for shortcut and flow matching; diffusion: any t in (0, 1) that
        leaves room for the steps in its DDPM chain; regression: none). Returns
        it as a float (or None); raises ``ValueError`` naming ``warm_start`` otherwise."""
        if tau is None:
            return None
        try:
            ts = self.objective.check_t_start(tau, self.check_steps(steps))
        except ValueError as e:
            raise ValueError(f"warm_start={tau!r}: {e}") from None
        if ts == 0.0:
            raise ValueError(f"warm_start={tau!r}: expected a time in (0, 1) (null: no warm start)")
        return ts

    def next_prior(self, window: torch.Tensor, n_executed: int | None = None) -> torch.Tensor:
        """The prior for the next chunk after ``n_executed`` (default Ta) actions of ``window`` (B, H, Da) were
        executed: the window shifted by n_executed steps (its step j + n_executed becomes step j, since the next
        observation is n_executed env steps later), the last action repeated to fill H. Normalised units."""
        n = self.n_action_steps if n_executed is None else int(n_executed)
        if not 0 <= n < self.horizon:
            raise ValueError(f"n_executed={n}: expected 0 <= n < horizon {self.horizon}")
        tail = window[:, n:]
        return torch.cat([tail, tail[:, -1:].expand(-1, n, -1)], dim=1)

    def _execute(self, naction: torch.Tensor) -> torch.Tensor:
        """Normalised window (B, H, Da) -> the Ta executed actions (B, Ta, Da) in environment units (from To - 1)."""
        action = self.normalizer.unnormalize({"action": naction})["action"]
        start = self.n_obs_steps - 1
        return action[:, start : start + self.n_action_steps]

    def actions_from_noise(self, obs: Mapping[str, torch.Tensor], x0: torch.Tensor, steps: int, **sample_kw):
        """The tensor-in / tensor-out core of :meth:`predict_action`, also the body of the exported graph
        (:class:`shortcut_policy.deploy.export.ExportablePolicy`): observations {key: (B, To, ...)} tensors in
        environment units and initial noise x0 (B, H, Da) -> executed actions (B, Ta, Da) in environment units
        (normalise, encode, ``steps``-step sampling, clamp to [-1, 1], unnormalise, slice from To - 1)."""
        return self._execute(self._sample_window(obs, x0, steps, **sample_kw))

    def _sample_window(self, obs: Mapping[str, torch.Tensor], x0: torch.Tensor, steps: int, **sample_kw):
        """Normalise and encode ``obs`` {key: (B, To, ...)}, sample from x0 (B, H, Da) in ``steps`` steps and clamp:
        the normalised window (B, H, Da) in [-1, 1]."""
        cond = self.obs_encoder(self.normalizer.normalize(dict(obs)))
        return self.objective.sample(self.net, x0, cond, steps=steps, **sample_kw).clamp(-1.0, 1.0)


# -------------------------------------------------------------------------------------------------------------
def build_policy(cfg, normalizer) -> Policy:
    """Policy from a resolved config (task, net, objective) and a fitted (or empty, to load into) normaliser."""
    task = to_plain(cfg["task"])
    enc_cfg = task.get("encoder", {}) or {}
    encoder = ObsEncoder(
        task["obs_shapes"],
        task.get("lowdim_keys", []),
        task.get("image_keys", []),
        task["n_obs_steps"],
        crop_shape=task.get("crop_shape"),
        feature_dim=enc_cfg.get("feature_dim", 64),
        resnet_width=enc_cfg.get("resnet_width", 64),
        num_kp=enc_cfg.get("num_kp", 32),
        obs_order=task.get("obs_order"),
        share_encoder=bool(enc_cfg.get("share", False)),
        color_jitter=enc_cfg.get("color_jitter"),
    )
    objective = build_objective(cfg["objective"])
    net = build_net(
        cfg["net"], **objective.net_options(), input_dim=task["action_dim"], global_cond_dim=encoder.out_dim
    )
    if hasattr(objective, "bind_net"):  # score_distillation trains a second net shaped like the policy's
        objective.bind_net(net)
    policy = Policy(
        net,
        objective,
        encoder,
        normalizer,
        horizon=task["horizon"],
        n_obs_steps=task["n_obs_steps"],
        n_action_steps=task["n_action_steps"],
        action_dim=task["action_dim"],
        default_steps=int(task.get("default_steps", 1)),
        task_name=task.get("name", ""),
    )
    policy.task_cfg = task
    return policy


def load_policy(path, device="cpu", weights: str | None = None, expect_task: str | None = None) -> Policy:
    """Rebuild a policy from a checkpoint path alone (config, normaliser, EMA or online ``weights``; None = the
    checkpoint's ``train.eval_model``). Raises ``ValueError`` for other weights, a non-policy checkpoint or another
    task than ``expect_task``."""
    ck = load_checkpoint(path)
    cfg = OmegaConf.create(ck["cfg"])
    if cfg.task.get("kind", "policy") != "policy":
        raise ValueError(f"checkpoint {path}: task {cfg.task.get('name')!r} is an image model, not a policy")
    if expect_task is not None and cfg.task.name != expect_task:
        raise ValueError(f"checkpoint {path} was trained on task {cfg.task.name!r}, not {expect_task!r}")
    which = weights or cfg.train.get("eval_model", "ema")
    if which not in ("ema", "online"):
        raise ValueError(f"weights={which!r}: expected 'ema', 'online' or null (the checkpoint's train.eval_model)")
    sd = ck["ema"]["model"] if which == "ema" else ck["model"]
    normalizer = LinearNormalizer.from_state_dict(sd, prefix="normalizer.")
    policy = build_policy(cfg, normalizer)
    policy.load_state_dict(sd)
    policy.cfg = cfg
    policy.loaded_weights = which  # "ema" | "online": reported by eval
    return policy.to(device).eval()
