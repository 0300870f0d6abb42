"""``shortcut-policy import checkpoint=FILE.ckpt out=DIR [overwrite=false weights=auto task=null]``
(configs/import.yaml): a Diffusion Policy checkpoint (its U-Net low-dim or U-Net hybrid-image policy) converted into a
checkpoint of this project, ``DIR/model.ckpt``, that ``eval``, ``deploy``, ``export`` and ``train.init_weights``
take. The reading, checks and weight mapping are :mod:`shortcut_policy.dp_import`; the rest of the config (the
task's env, data and evaluation settings, the train section) is this project's config for the task of the run's
name, composed here. Nothing is written to ``out`` before the whole conversion has succeeded."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from ..checkpoint import FORMAT_VERSION, save_checkpoint
from ..dp_import import DPImportError, convert_dp, inspect_dp, read_dp_checkpoint
from ..utils import atomic_write_text
from .runner import _configs_dir, compose

__all__ = ["import_command", "import_command_preflight"]

OUT_FILES = ("model.ckpt", "config.yaml", "import.json")


def _check_out(cfg) -> Path:
    """The output directory; refuses a missing ``out``, a file, or an existing non-empty directory without
    ``overwrite=true``."""
    if not cfg.get("out"):
        raise ValueError("import: out=DIR is required (the directory that receives model.ckpt)")
    out = Path(str(cfg.out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not bool(cfg.get("overwrite", False)):
        raise ValueError(
            f"out={out}: the directory exists and is not empty; pass overwrite=true to replace "
            f"{', '.join(OUT_FILES)} in it, or choose another out"
        )
    return out


def import_command_preflight(cfg, run_dir) -> dict:
    """Before the CLI writes anything: the checkpoint exists and ``out`` may be written."""
    if not cfg.get("checkpoint"):
        raise ValueError("import: checkpoint=FILE.ckpt (a Diffusion Policy checkpoint) is required")
    if not Path(str(cfg.checkpoint)).is_file():
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such file")
    _check_out(cfg)
    return {}


def import_command(cfg, run_dir) -> dict:
    """Read, check and convert the checkpoint, then write ``out/model.ckpt`` (atomically), ``out/config.yaml`` and
    ``out/import.json``; RESULT: what was imported (policy class, task, weights, sampler, sizes, skipped entries)."""
    out = _check_out(cfg)
    dp = read_dp_checkpoint(cfg.checkpoint)
    spec = inspect_dp(dp)
    task = str(cfg.get("task") or spec.task_name or "")
    tasks = sorted(p.stem for p in (_configs_dir() / "task").glob("*.yaml"))
    if task not in tasks:
        raise DPImportError(
            f"{dp.path}: the run's task {task or '<none>'!r} has no counterpart here (tasks: {', '.join(tasks)}); "
            "pass task=<one of them> if the observations and actions match"
        )
    base = OmegaConf.to_container(
        compose("train", [f"task={task}", "net=unet1d", "objective=diffusion", "logger=none"]), resolve=True
    )
    if base["task"].get("kind", "policy") != "policy":
        raise DPImportError(f"task={task}: an image-generation task, not a policy task")
    payload, summary = convert_dp(dp, spec, base, weights=str(cfg.get("weights") or "auto"))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(out / "model.ckpt", payload)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(payload["cfg"])))
    info = {"source": str(Path(str(cfg.checkpoint)).resolve()), "format_version": FORMAT_VERSION, **summary}
    atomic_write_text(out / "import.json", json.dumps(info, indent=2))
    steps = summary["num_inference_steps"]
    return {
        **summary,
        "checkpoint": str(ckpt),
        "next": f"shortcut-policy eval checkpoint={ckpt} steps=[{steps}]",
    }
