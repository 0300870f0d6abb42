"""Checkpoint files: one file holds the resolved config, online + EMA weights (normaliser included, it is part of
the model's state_dict), optimiser/scheduler state, step and metrics; written atomically (temp + rename).

Below the policy / generator layer (they load checkpoints) and the trainer (it writes them); the top-k bookkeeping
of a training run is :class:`shortcut_policy.train.checkpoint.TopK`.

Format versions (``format_version`` in the file; a file without one is version 1):

* 1: the diffusion objective fed the net t = 1 - k/K (scaled by the net's time scale: 100 - k for the U-Net),
  every U-Net / MLP had the step-size branch (``net.use_step_size: true``) and the U-Net's sinusoid rounded its
  frequencies its own way.
* 2: the diffusion objective feeds Diffusion Policy's DDPM step k (``objective.time_input: step``), objectives that
  do not use a step size get nets without the branch (``net.use_step_size: auto``), the U-Net's sinusoid rounds as
  Diffusion Policy's (``net.embed_freqs: dp``).

:func:`load_checkpoint` migrates an older file in memory (:func:`migrate`): it writes the old behaviour into the
config as explicit settings (``objective.time_input: flipped``, ``net.use_step_size: true``,
``net.embed_freqs: legacy``), so the rebuilt model has the same parameters and predicts exactly as before. The
file on disk is not changed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .utils import atomic_path

FORMAT_VERSION = 2


def save_checkpoint(path, payload: dict) -> Path:
    """Write ``{"format_version": FORMAT_VERSION, **payload}`` with ``torch.save`` to ``path`` atomically (temp file
    + rename; a killed write leaves the previous checkpoint intact). Returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    return path


def _migrate_1_to_2(ckpt: dict) -> dict:
    """Pin format 1's behaviour in ``ckpt["cfg"]`` (in place); returns {dotted key: value} of every setting that
    carries it (written now or already explicit), so that a resumed format-1 run can keep them."""
    cfg = ckpt.get("cfg")
    pinned = {}
    if not isinstance(cfg, dict):
        return pinned
    net, obj = cfg.get("net"), cfg.get("objective")
    if isinstance(net, dict) and net.get("kind") in ("unet1d", "mlp"):
        if net.get("use_step_size", "auto") in ("auto", None):  # format 1 nets always had the branch
            net["use_step_size"] = True
        pinned["net.use_step_size"] = net["use_step_size"]
        if net.get("kind") == "unet1d":
            net.setdefault("embed_freqs", "legacy")
            pinned["net.embed_freqs"] = net["embed_freqs"]
    if isinstance(obj, dict) and obj.get("name") == "diffusion":
        obj.setdefault("time_input", "flipped")
        pinned["objective.time_input"] = obj["time_input"]
    return pinned


_MIGRATIONS = {1: _migrate_1_to_2}


def migrate(ckpt: dict, where="checkpoint") -> dict:
    """Bring a loaded checkpoint dict to :data:`FORMAT_VERSION` in place (see the module docstring); records the
    original version in ``ckpt["migrated_from"]`` and the settings that keep its behaviour in ``ckpt["migration"]``
    ({dotted key: value}; :func:`shortcut_policy.commands.train.keep_checkpoint_format` applies them on resume). Raises
    ``ValueError`` for a version newer than this code knows. Returns ``ckpt``."""
    version = ckpt.get("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: format_version={version!r} is not a checkpoint format version")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: checkpoint format {version} is newer than this shortcut_policy reads ({FORMAT_VERSION}); "
            "update shortcut_policy"
        )
    if version == FORMAT_VERSION:
        return ckpt
    pinned = {}
    for v in range(version, FORMAT_VERSION):
        pinned.update(_MIGRATIONS[v](ckpt))
    ckpt["migrated_from"], ckpt["migration"], ckpt["format_version"] = version, pinned, FORMAT_VERSION
    return ckpt


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` onto ``map_location`` (default CPU), migrated to the
    current format (:func:`migrate`).

    Raises ``FileNotFoundError`` when ``path`` is not a file and ``ValueError`` when it is not a readable torch file,
    lacks the ``cfg`` / ``model`` entries of a shortcut_policy checkpoint or has a format newer than this code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        hint = ""
        if isinstance(ckpt, dict) and "state_dicts" in ckpt and "cfg" in ckpt:
            hint = " (it looks like a Diffusion Policy checkpoint: convert it with `shortcut-policy import`)"
        raise ValueError(f"checkpoint {path}: missing 'cfg'/'model' entries; not a shortcut_policy checkpoint{hint}")
    return migrate(ckpt, f"checkpoint {path}")
