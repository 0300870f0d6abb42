"""Checkpoint files: one file holds the resolved config, online + EMA weights (normaliser included, it is part of
the model's state_dict), optimiser/scheduler state, step and metrics; written atomically (temp + rename).

Below the policy / generator layer (they load checkpoints) and the trainer (it writes them); the top-k bookkeeping
of a training run is :class:`shortcut_policy.train.checkpoint.TopK`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .utils import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path, payload: dict) -> Path:
    """Write ``{"format_version": FORMAT_VERSION, **payload}`` with ``torch.save`` to ``path`` atomically (temp file
    + rename; a killed write leaves the previous checkpoint intact). Returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` onto ``map_location`` (default CPU).

    Raises ``FileNotFoundError`` when ``path`` is not a file and ``ValueError`` when it is not a readable torch file
    or lacks the ``cfg`` / ``model`` entries of a shortcut_policy checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        raise ValueError(f"checkpoint {path}: missing 'cfg'/'model' entries; not a shortcut_policy checkpoint")
    return ckpt
