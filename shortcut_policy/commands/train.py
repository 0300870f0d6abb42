"""``shortcut-policy train task=<task> net=<net> objective=<objective> [logger=...] [train.*=...]``
(configs/train.yaml).

``train_command_preflight`` runs before the CLI writes anything into the run directory (the CLI looks up
``<fn>_preflight`` in the verb's module): an unknown objective key or a resume whose fixed settings differ from
the checkpoint's is refused there.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..builders import build_training
from ..checkpoint import load_checkpoint
from ..nets import TIME_SCALE_KEY
from ..objectives import build_objective
from ..train.trainer import Trainer, check_resume, seed_everything

__all__ = ["train_command", "train_command_preflight"]


def pin_net_options(cfg) -> None:
    """Write what the objective decides about the net into ``cfg.net`` (in place), so checkpoints state it
    explicitly: ``use_step_size: auto`` -> the objective's ``uses_step_size``; the time scale the objective needs
    (diffusion: 1, it feeds integer DDPM steps). Raises ``ValueError`` for an unknown objective or key."""
    from omegaconf import open_dict

    objective = build_objective(cfg.objective)
    net = cfg.get("net")
    if net is None:
        return
    with open_dict(net):
        if "use_step_size" in net and net.get("use_step_size") in ("auto", None):
            net.use_step_size = bool(objective.uses_step_size)
        key = TIME_SCALE_KEY.get(net.get("kind"))
        if objective.net_time_scale is not None and key is not None:
            net[key] = float(objective.net_time_scale)


def keep_checkpoint_format(cfg, ck) -> dict:
    """A run resumed from a checkpoint of an older format keeps that format's behaviour: the settings its migration
    pinned (``ck["migration"]``: e.g. ``objective.time_input: flipped``, ``net.embed_freqs: legacy``) are written
    into ``cfg`` (in place). Returns them ({} for a current-format checkpoint)."""
    from omegaconf import OmegaConf, open_dict

    kept = dict(ck.get("migration") or {})
    with open_dict(cfg):
        for key, value in kept.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return kept


def train_command_preflight(cfg, run_dir) -> dict:
    """Called by the CLI before it writes anything into run_dir: refuses a resume whose fixed settings differ from
    the checkpoint's (ValueError naming the keys); returns {'resume_changes': {key: [old, new]}} otherwise, and
    {'kept_format_settings': {...}} when the checkpoint is of an older format (:func:`keep_checkpoint_format`)."""
    obj = build_objective(cfg.objective)  # an unknown or misspelt objective key fails here, before anything is written
    if getattr(obj, "needs_teacher_checkpoint", False):
        if not obj.teacher_checkpoint:
            raise ValueError(
                f"objective={obj.name} needs a trained teacher: set objective.teacher_checkpoint=PATH (a checkpoint "
                f"of the same task), or run `shortcut-policy distill teacher=PATH objective={obj.name}`"
            )
        if not Path(str(obj.teacher_checkpoint)).is_file():
            raise FileNotFoundError(f"objective.teacher_checkpoint={obj.teacher_checkpoint}: no such checkpoint file")
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not (cfg.train.get("resume", True) and last.exists()):
        pin_net_options(cfg)
        return {}
    ck = load_checkpoint(last)
    kept = keep_checkpoint_format(cfg, ck)
    pin_net_options(cfg)
    changed = check_resume(cfg, ck["cfg"], last)
    notes = {"resume_changes": {k: [a, b] for k, (a, b) in changed.items()}} if changed else {}
    if kept:
        notes["kept_format_settings"] = {"from_format": ck.get("migrated_from"), **kept}
    return notes


def train_command(cfg, run_dir):
    """`shortcut-policy train task=... net=... objective=...`: the task kind's model, data and evaluator
    (:func:`shortcut_policy.builders.build_training`: policy | image), trained by :class:`Trainer`."""
    # every random draw (weight init, data order, dropout, bootstrap levels) follows from train.seed: seed BEFORE
    # the network is built (the Trainer seeds again per rank for the loop)
    seed_everything(int(cfg.train.seed) + int(os.environ.get("RANK", "0")))
    pin_net_options(cfg)
    model, train_ds, val_ds, evaluator = build_training(cfg, run_dir)
    trainer = Trainer(model, cfg, run_dir, train_dataset=train_ds, evaluator=evaluator, val_dataset=val_ds)
    return trainer.fit()
