"""One objective-agnostic training loop for policies and image models.

The model is an nn.Module whose forward(batch, teacher=None) returns (loss, info) (Policy and ImageGenerator
define forward = compute_loss). The trainer owns AdamW, the LR schedule, the EMA (the shortcut bootstrap
teacher when `objective.teacher=ema`, and the evaluation weights), checkpoints (last + top-k by score,
atomic, resumable), logging (JSON lines + wandb offline) and DDP under torchrun (rank-0-only logging and
checkpointing, DistributedSampler; the batch size in the config is the GLOBAL batch).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..objectives import OBJECTIVES
from ..utils import resolve_device
from .checkpoint import TopK
from .ema import EMA
from .logging import Logger


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG (seed mod 2^32) and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_distributed(device_name="auto"):
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = resolve_device(device_name)
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        return rank, world, dev
    return 0, 1, resolve_device(device_name)


def to_device(batch, device):
    """Move every tensor in a (nested) dict / list / tuple batch to ``device`` (non-blocking); other values pass
    through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_lr_lambda(schedule: str, warmup: int, total: int):
    """The LR multiplier as a function of the optimiser step s (for ``LambdaLR``): linear warm-up (s + 1) / warmup
    for s < warmup, then 1 (``"constant"``) or a half cosine from 1 to 0 over the remaining ``total - warmup`` steps
    (``"cosine"``). Raises ``ValueError`` for another schedule."""
    if schedule == "constant":
        return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":

        def f(s):
            if s < warmup:
                return (s + 1) / warmup
            p = min(1.0, (s - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * p))

        return f
    raise ValueError(f"train.lr_schedule={schedule!r}: expected 'cosine' or 'constant'")


def infinite_loader(
    dataset, batch_size: int, rank: int, world: int, seed: int, num_workers: int = 0, start_step: int = 0
):
    """Yield batches forever, in an order that is a pure function of (seed, step): batch i of the run is the same
    whether the run was resumed or not. Epoch e shuffles with a generator seeded `seed + e` (DDP: a
    DistributedSampler with that seed, each rank gets batch_size // world rows); a run resumed at `start_step` skips
    the batches already used in its epoch without loading them. Loader workers are seeded from (seed, epoch).

    Raises ValueError when the batch does not divide over the processes or the dataset is smaller than a batch.
    """
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
    per_rank = batch_size // world
    if len(dataset) < per_rank:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than the per-process batch of {per_rank}")

    def epoch_indices(epoch: int) -> list[int]:
        if world > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            sampler.set_epoch(epoch)
            return list(sampler)
        g = torch.Generator().manual_seed(seed + epoch)
        return torch.randperm(len(dataset), generator=g).tolist()

    per_epoch = len(epoch_indices(0)) // per_rank
    epoch, skip = divmod(int(start_step), per_epoch)
    while True:
        idx = epoch_indices(epoch)[skip * per_rank : per_epoch * per_rank]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # worker seeds (augmentation in workers)
        loader = DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=idx,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=False,
            generator=g,
        )
        yield from loader
        epoch, skip = epoch + 1, 0


# Settings a resumed run may change (they take effect and are logged); every other key of net / objective / task /
# train must equal the checkpoint's, or the resume is refused before anything is written.
RESUME_CHANGEABLE = (
    "train.num_steps",
    "train.lr",
    "train.lr_schedule",
    "train.warmup_steps",
    "train.weight_decay",
    "train.betas",
    "train.eps",
    "train.grad_clip",
    "train.eval_every",
    "train.eval_episodes",
    "train.eval_seed_start",
    "train.eval_steps",
    "train.eval_n_action_steps",
    "train.eval_warm_start",
    "train.eval_model",
    "train.checkpoint_every",
    "train.log_every",
    "train.topk",
    "train.topk_key",
    "train.threads",
    "train.device",
    "train.max_minutes",
    "train.num_workers",
    "train.amp",
    "train.resume",
    "train.init_weights",
    "train.init_normalizer",
    "train.deterministic",
    "task.eval",
)
RESUME_COMPARED = ("net", "objective", "task", "train")


def _objective_default(objective_cfg: dict, key: str):
    """The constructor default of option ``key`` ("objective.<option>") of the objective named in ``objective_cfg``,
    or a sentinel when there is none: an option added after a run was written reproduces that run at its default."""
    cls = OBJECTIVES.get((objective_cfg or {}).get("name"))
    param = inspect.signature(cls.__init__).parameters.get(key.partition(".")[2]) if cls else None
    return param.default if param is not None and param.default is not inspect.Parameter.empty else _NO_DEFAULT


_NO_DEFAULT = object()


def _flatten(d, prefix="") -> dict:
    """Nested dict -> {"a.b.c": leaf} (``prefix`` ends with a dot); a non-dict is one leaf."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resume_diff(new_cfg, old_cfg) -> tuple[dict, dict]:
    """Compare a run's config with the config stored in its checkpoint.

    Returns (fixed, changed): dicts mapping dotted keys to (checkpoint value, new value); `fixed` holds keys that
    may not change on resume (net, objective, task, data, seed, batch, EMA), `changed` the allowed changes. An
    objective option absent from the checkpoint (added later) equals its constructor default; a train option absent
    from it equals null.
    """

    def plain(c):
        return OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c

    new, old = plain(new_cfg), plain(old_cfg)
    fixed, changed = {}, {}
    for section in RESUME_COMPARED:
        a, b = _flatten(old.get(section, {}), f"{section}."), _flatten(new.get(section, {}), f"{section}.")
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
            if va == vb or (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
                continue
            if va == "<absent>" and section == "objective" and vb == _objective_default(new.get("objective"), key):
                continue  # an objective option added after the run was written, at its default: the run's behaviour
            if va == "<absent>" and section == "train" and vb is None:
                continue  # a train option added after the run was written, off (null): the run's behaviour
            allowed = any(key == c or key.startswith(c + ".") for c in RESUME_CHANGEABLE)
            (changed if allowed else fixed)[key] = (va, vb)
    return fixed, changed


def check_resume(cfg, ckpt_cfg, ckpt_path) -> dict:
    """Raise ValueError naming every fixed key whose value differs from the checkpoint's; return the allowed changes."""
    fixed, changed = resume_diff(cfg, ckpt_cfg)
    if fixed:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in list(fixed.items())[:12])
        more = f" (+{len(fixed) - 12} more)" if len(fixed) > 12 else ""
        restore = [
            f"{'+' if b == '<absent>' else ''}{k}={a if isinstance(a, str) else json.dumps(a, separators=(',', ':'))}"
            for k, (a, b) in fixed.items()
            if a != "<absent>"
        ]
        hint = f" ({' '.join(restore)})" if restore and len(restore) <= 6 else ""
        raise ValueError(
            f"cannot resume {ckpt_path}: settings that cannot change on resume differ: {lines}{more}. "
            "Use a new run_dir (or train.init_weights=... to start a new run from these weights), or "
            f"restore these settings{hint}"
        )
    return changed


def _objective_state_from(sd: dict, target, what: str) -> dict:
    """The state dict ``sd`` of a checkpoint (``what`` "model", or "ema" = {"model", "step"}) to load into ``target``
    (the model or its EMA): its ``objective.*`` entries (schedule counters) are kept only when they have the same
    names as the target's, else replaced by the target's own (a distillation student keeps its schedule)."""
    inner = sd["model"] if what == "ema" else sd
    mod = target.model if what == "ema" else target
    mine = {k: v for k, v in mod.state_dict().items() if k.startswith("objective.")}
    if set(mine) == {k for k in inner if k.startswith("objective.")}:
        return sd
    inner = {**{k: v for k, v in inner.items() if not k.startswith("objective.")}, **mine}
    return {**sd, "model": inner} if what == "ema" else inner


class Trainer:
    """Trains ``model`` (forward(batch, teacher=None) -> (loss, info)) with the ``train`` section of ``cfg``: AdamW, the
    LR schedule, EMA, bf16 autocast on CUDA, gradient clipping, periodic evaluation (``evaluator(model, step) ->
    dict``), last + top-k checkpoints in ``<run_dir>/checkpoints`` and logging. Batches come from ``batches`` (an
    iterator) or ``train_dataset`` (:func:`infinite_loader`). An existing ``checkpoints/last.ckpt`` is resumed (see
    :meth:`load`); ``train.init_weights`` starts from another run's weights. Raises ``ValueError`` without data."""

    def __init__(
        self,
        model: nn.Module,
        cfg,
        run_dir,
        train_dataset=None,
        batches=None,
        evaluator=None,
        val_dataset=None,
        progress: bool = True,
    ):
        self.cfg, self.tcfg = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.rank, self.world, self.device = setup_distributed(self.tcfg.get("device", "auto"))
        self.is_main = self.rank == 0
        seed_everything(int(self.tcfg.seed) + self.rank)
        if self.tcfg.get("deterministic"):
            torch.use_deterministic_algorithms(True, warn_only=False)
        if self.tcfg.get("threads"):
            torch.set_num_threads(int(self.tcfg.threads))  # on a busy CPU one thread avoids OpenMP oversubscription
        self.model = model.to(self.device)
        self.evaluator, self.val_dataset, self.progress = evaluator, val_dataset, progress
        self.num_steps = int(self.tcfg.num_steps)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=float(self.tcfg.lr),
            betas=tuple(self.tcfg.betas),
            eps=float(self.tcfg.eps),
            weight_decay=float(self.tcfg.weight_decay),
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, make_lr_lambda(self.tcfg.lr_schedule, int(self.tcfg.warmup_steps), self.num_steps)
        )
        e = self.tcfg.ema
        self.ema = EMA(
            self.model, decay=float(e.decay), warmup=e.warmup, power=float(e.power), inv_gamma=float(e.inv_gamma)
        )
        self.step, self.epoch = 0, 0
        self.resume_changes: dict = {}
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.topk = TopK(self.ckpt_dir, k=int(self.tcfg.topk), key=str(self.tcfg.topk_key)) if self.is_main else None
        self.best_metrics: dict = {}
        self.frozen_teacher = None  # a trained teacher (objective.teacher_checkpoint): distillation objectives
        self.frozen_teacher_kind = "checkpoint"  # or "student": progressive's copy of the student
        obj = getattr(self.model, "objective", None)
        if getattr(obj, "needs_teacher_checkpoint", False):
            self.frozen_teacher = self._load_frozen_teacher(obj)
        if self.tcfg.get("resume", True) and (self.ckpt_dir / "last.ckpt").exists():
            self.load(self.ckpt_dir / "last.ckpt")
        elif self.tcfg.get("init_weights"):
            self.init_weights(self.tcfg.init_weights)
        if self.frozen_teacher is not None:
            self._check_teacher_normalizer(obj.teacher_checkpoint)
        if self.world > 1:
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.net = self.model
        if batches is None:
            if train_dataset is None:
                raise ValueError("Trainer needs a train_dataset or a batch iterator")
            batches = infinite_loader(
                train_dataset,
                int(self.tcfg.batch_size),
                self.rank,
                self.world,
                int(self.tcfg.seed),
                int(self.tcfg.get("num_workers", 0)),
                start_step=self.step,
            )
        self.batches = batches
        self.logger = Logger(self.run_dir, cfg, cfg.get("logger"), enabled=self.is_main)
        if self.step and self.is_main:  # resumed: rows a killed attempt logged past the checkpoint are dropped
            self.logger.truncate_after(self.step)
            if self.topk is not None:
                self.topk.drop_after(self.step)
            if self.resume_changes:
                self.logger.log(
                    {"resume_changes": json.dumps({k: [a, b] for k, (a, b) in self.resume_changes.items()})}, self.step
                )
        amp = self.tcfg.get("amp", "auto")
        # CUDA: bf16 autocast unless amp=false. CPU: fp32 unless amp=bf16 (opt-in: CPUs with AVX512-BF16 run the
        # U-Net's convolutions faster in bf16; the weights, the EMA and the optimiser stay fp32).
        self.autocast_device = self.device.type if self.device.type in ("cuda", "cpu") else "cpu"
        self.autocast = (self.device.type == "cuda" and amp in ("auto", "bf16", True)) or (
            self.device.type == "cpu" and amp == "bf16"
        )

    # --- state ------------------------------------------------------------------------------------------
    def payload(self, metrics=None) -> dict:
        """The checkpoint contents: resolved config, online and EMA weights, optimiser and scheduler state, step,
        ``metrics``, the best evaluation so far and the RNG states (torch, NumPy, Python)."""
        return {
            "cfg": OmegaConf.to_container(self.cfg, resolve=True),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "metrics": metrics or {},
            "best_metrics": self.best_metrics,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            **(
                {"frozen_teacher": self.frozen_teacher.state_dict(), "frozen_teacher_kind": self.frozen_teacher_kind}
                if self.frozen_teacher is not None
                else {}
            ),
        }

    def load(self, path) -> None:
        """Resume this run from its own checkpoint: weights, EMA, optimiser, schedule, step, RNG streams. Fixed
        settings must match the checkpoint (ValueError naming the keys); allowed changes (num_steps, lr, eval
        frequency, ...) take effect and are printed and logged as `resume_changes`."""
        ck = load_checkpoint(path, map_location=self.device)
        self.resume_changes = check_resume(self.cfg, ck["cfg"], path)
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step = int(ck["step"])
        if self.frozen_teacher is not None and "frozen_teacher" in ck:  # progressive: the stage's teacher, exactly
            if ck.get("frozen_teacher_kind") == "student":
                self.frozen_teacher = copy.deepcopy(self.model).eval()
                for p in self.frozen_teacher.parameters():
                    p.requires_grad_(False)
                self.frozen_teacher_kind = "student"
            self.frozen_teacher.load_state_dict(ck["frozen_teacher"])
        self.best_metrics = ck.get("best_metrics", {})
        # the schedule follows THIS command's lr / num_steps / warm-up (a new total re-shapes the cosine from here on)
        lr = float(self.tcfg.lr)
        for g in self.opt.param_groups:
            g["initial_lr"] = lr
            g["weight_decay"] = float(self.tcfg.weight_decay)
            g["betas"], g["eps"] = tuple(self.tcfg.betas), float(self.tcfg.eps)
        self.sched.base_lrs = [lr for _ in self.opt.param_groups]
        self.sched.lr_lambdas = [
            make_lr_lambda(self.tcfg.lr_schedule, int(self.tcfg.warmup_steps), self.num_steps)
            for _ in self.opt.param_groups
        ]
        for g, base, f in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            g["lr"] = base * f(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        rng = ck.get("rng")
        if rng and self.world == 1:
            torch.set_rng_state(rng["torch"].cpu())
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
            for k, (a, b) in self.resume_changes.items():
                print(f"resume: {k} changed from {a!r} to {b!r} (takes effect now)", flush=True)

    def _load_frozen_teacher(self, objective):
        """The frozen teacher of a distillation objective: the model class's ``load_teacher(path, like=model)``
        (Policy: a policy checkpoint of the same task and spaces; ImageGenerator: the same image space), in eval mode
        without gradients. Raises ``ValueError`` (no path; a teacher the method cannot use; a model class
        that cannot distil, :meth:`TrainableModel.load_teacher`) or ``FileNotFoundError`` before training starts."""
        path = objective.teacher_checkpoint
        if not path:
            raise ValueError(
                f"objective={objective.name} needs a trained teacher: set objective.teacher_checkpoint=PATH (a "
                "checkpoint of the same task), or run `shortcut-policy distill teacher=PATH "
                f"objective={objective.name}`"
            )
        if not Path(str(path)).is_file():
            raise FileNotFoundError(f"objective.teacher_checkpoint={path}: no such checkpoint file")
        teacher = type(self.model).load_teacher(str(path), like=self.model).to(self.device).eval()  # TrainableModel
        objective.check_teacher(teacher.objective, f"objective.teacher_checkpoint={path}")
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.is_main:
            print(f"teacher: {path} (objective={teacher.objective.name}), frozen", flush=True)
        return teacher

    def _check_teacher_normalizer(self, path) -> None:
        """Refuse a teacher whose normaliser differs from this run's (its targets would be in other units)."""
        mine = {k: v for k, v in self.model.state_dict().items() if k.startswith("normalizer.")}
        theirs = {k: v for k, v in self.frozen_teacher.state_dict().items() if k.startswith("normalizer.")}
        for k, v in mine.items():
            w = theirs.get(k)
            if w is None or w.shape != v.shape or not torch.allclose(w.to(v), v, rtol=1e-4, atol=1e-5):
                raise ValueError(
                    f"objective.teacher_checkpoint={path}: the teacher's normaliser ({k}) differs from this run's: it "
                    "was trained on other data. Distil on the teacher's data, or start from its weights "
                    "(train.init_weights=<teacher> with train.init_normalizer=checkpoint)"
                )

    def refresh_teacher(self) -> None:
        """Progressive distillation: the frozen teacher becomes a copy of the student (EMA weights when the
        objective's ``teacher`` is "ema", the reference's ``bootstrap_ema``); called at the start of each stage."""
        obj = self.model.objective
        src = self.ema.model if getattr(obj, "teacher", "ema") == "ema" else self.model
        self.frozen_teacher = copy.deepcopy(src).eval()
        for p in self.frozen_teacher.parameters():
            p.requires_grad_(False)
        self.frozen_teacher_kind = "student"
        obj.mark_refreshed()

    def init_weights(self, path) -> None:
        """Fine-tune / continue: online and EMA weights (normaliser included) from another run's checkpoint, with a
        fresh optimiser, schedule and step count. Resuming this run's own last.ckpt takes precedence."""
        path = Path(str(path))
        if not path.is_file():
            raise FileNotFoundError(f"train.init_weights={path}: no such checkpoint file")
        keep_from = str(self.tcfg.get("init_normalizer", "checkpoint"))
        if keep_from not in ("checkpoint", "data"):
            raise ValueError(f"train.init_normalizer={keep_from!r}: expected 'checkpoint' or 'data'")
        # "data": keep the normaliser fitted to THIS run's dataset (e.g. new demonstrations reach past the old range)
        fitted = {k: v.clone() for k, v in self.model.state_dict().items() if k.startswith("normalizer.")}
        ck = load_checkpoint(path, map_location=self.device)
        for what, target, sd in (("model", self.model, ck.get("model")), ("ema", self.ema, ck.get("ema"))):
            if sd is None:
                raise KeyError(f"train.init_weights={path}: the checkpoint has no {what!r} entry")
            # the objective's own state (schedule counters) comes from the checkpoint only when the objectives agree
            # (a consistency run continues its schedule); a distillation student keeps its own
            sd = _objective_state_from(sd, target, what)
            try:
                target.load_state_dict(sd)
            except RuntimeError as e:
                raise ValueError(
                    f"train.init_weights={path}: its {what} weights do not fit this run's network "
                    f"(net / task config differ?): {str(e).splitlines()[0]}"
                ) from None
        if keep_from == "data":
            if not fitted:
                raise ValueError("train.init_normalizer=data: this run's model has no normaliser to keep")
            for m in (self.model, self.ema.model):
                m.load_state_dict(fitted, strict=False)
        if self.is_main:
            print(
                f"initialised weights from {path} (step {ck.get('step')}, normaliser from the {keep_from}); "
                "optimiser and schedule start fresh",
                flush=True,
            )

    def save_last(self, metrics=None) -> None:
        """Write ``checkpoints/last.ckpt`` (rank 0 only) with ``metrics``."""
        if self.is_main:
            save_checkpoint(self.ckpt_dir / "last.ckpt", self.payload(metrics))

    # --- training -----------------------------------------------------------------------------------------
    def teacher(self):
        """The network that builds self-consistency targets: the EMA copy when the objective's ``teacher`` is "ema"
        (the default for objectives without one), else the online model."""
        mode = getattr(getattr(self.model, "objective", None), "teacher", "ema")
        return self.ema.model if mode == "ema" else self.model

    def train_step(self, batch) -> dict:
        """One optimiser step on ``batch``: loss (bf16 autocast on CUDA, and on CPU with train.amp=bf16), backward,
        optional gradient clipping (``train.grad_clip``), AdamW and scheduler steps, EMA update. Returns the
        objective's info plus ``lr``, ``ema_decay`` and ``grad_norm`` (when clipping)."""
        self.model.train()
        batch = to_device(batch, self.device)
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16, enabled=self.autocast):
            obj = getattr(self.model, "objective", None)
            if self.frozen_teacher is not None and obj.teacher_refresh_due():
                self.refresh_teacher()
            extra = {} if self.frozen_teacher is None else {"frozen": self.frozen_teacher}
            loss, info = self.net(batch, teacher=self.teacher(), **extra)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.tcfg.get("grad_clip")
        if clip:
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip)))
        self.opt.step()
        self.sched.step()
        info["ema_decay"] = self.ema.update(self.model)
        info["lr"] = self.sched.get_last_lr()[0]
        self.step += 1
        return info

    def evaluate(self) -> dict:
        """Run the evaluator on the EMA (``train.eval_model=ema``) or online weights without disturbing the training RNG
        streams; updates the best metrics and offers a top-k checkpoint when ``train.topk_key`` is among the results.
        Returns the metrics ({} on non-zero ranks or without an evaluator)."""
        if self.evaluator is None or not self.is_main:
            return {}
        which = self.tcfg.get("eval_model", "ema")
        model = self.ema.model if which == "ema" else self.model
        model.eval()
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            metrics = self.evaluator(model, self.step) or {}  # rollouts seed their own noise; training RNG untouched
        random.setstate(py_state)
        np.random.set_state(np_state)
        key = str(self.tcfg.topk_key)
        if key in metrics:
            if metrics[key] >= self.best_metrics.get(key, -math.inf):
                self.best_metrics = {**metrics, "step": self.step}
            self.topk.consider(self.step, float(metrics[key]), self.payload(metrics))
        return metrics

    def fit(self) -> dict:
        """Train until ``train.num_steps`` (or ``train.max_minutes``), logging every ``log_every`` steps, evaluating
        every ``eval_every`` steps (and once at the end), checkpointing every ``checkpoint_every`` steps and at the end.
        Returns ``steps``, the last ``train_loss``, ``minutes``, ``stopped_early``, the ``checkpoint`` path and
        ``best_<metric>`` values."""
        t0 = time.time()
        max_min = self.tcfg.get("max_minutes")
        log_every, eval_every = int(self.tcfg.log_every), int(self.tcfg.get("eval_every") or 0)
        ckpt_every = int(self.tcfg.checkpoint_every)
        bar = tqdm(
            total=self.num_steps,
            initial=self.step,
            disable=not (self.is_main and self.progress),
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0 if os.isatty(2) else 30.0,
        )
        last_info, losses, stopped_early = {}, [], False
        try:
            while self.step < self.num_steps:
                info = self.train_step(next(self.batches))
                losses.append(info["loss"])
                bar.update(1)
                if self.step % log_every == 0 or self.step == 1:
                    info["train_loss"] = float(np.mean(losses))
                    losses = []
                    bar.set_postfix(loss=f"{info['train_loss']:.4f}", lr=f"{info['lr']:.1e}")
                    self.logger.log(info, self.step)
                    last_info = info
                if eval_every and self.step % eval_every == 0:
                    m = self.evaluate()
                    if m:
                        self.logger.log({f"eval/{k}": v for k, v in m.items()}, self.step)
                if self.step % ckpt_every == 0:
                    self.save_last(last_info)
                if max_min and (time.time() - t0) / 60.0 >= float(max_min):
                    stopped_early = True
                    break
        finally:
            bar.close()
        if eval_every and self.step % eval_every and self.evaluator is not None:
            m = self.evaluate()
            if m:
                self.logger.log({f"eval/{k}": v for k, v in m.items()}, self.step)
        self.save_last(last_info)
        self.logger.finish()
        result = {
            "steps": self.step,
            "train_loss": last_info.get("train_loss"),
            "minutes": (time.time() - t0) / 60.0,
            "stopped_early": stopped_early,
            "checkpoint": str(self.ckpt_dir / "last.ckpt"),
        }
        result.update({f"best_{k}": v for k, v in self.best_metrics.items() if isinstance(v, (int, float))})
        return result
