"""Checkpoints: one file holds the resolved config, online + EMA weights (normaliser included, it is part of
the model's state_dict), optimiser/scheduler state, step and metrics; written atomically (temp + rename)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..utils import atomic_path, atomic_write_text

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


class TopK:
    """Keep the k best checkpoints by a score (higher is better) plus `last.ckpt`."""

    def __init__(self, directory, k: int = 3, key: str = "test_mean_score"):
        self.dir, self.k, self.key = Path(directory), int(k), key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.dir / "topk.json"
        self.entries: list[dict] = json.loads(self.index_path.read_text()) if self.index_path.exists() else []

    def consider(self, step: int, score: float, payload: dict) -> Path | None:
        """Save ``payload`` as ``step<step>-<key>_<score>.ckpt`` when ``score`` (higher is better) is among the k best
        so far, delete the checkpoint it displaces and rewrite ``topk.json``. Returns the new file's path, or None when
        the score does not make the top k (or k = 0, or score is None)."""
        if self.k <= 0 or score is None:
            return None
        if len(self.entries) >= self.k and score <= min(e["score"] for e in self.entries):
            return None
        # no '=' in the name: every verb takes `checkpoint=PATH` as a Hydra override, which would reject it
        name = f"step{step:07d}-{self.key}_{score:.3f}.ckpt"
        path = save_checkpoint(self.dir / name, payload)
        self.entries.append({"step": step, "score": float(score), "path": name})
        self.entries.sort(key=lambda e: -e["score"])
        for e in self.entries[self.k :]:
            (self.dir / e["path"]).unlink(missing_ok=True)
        self.entries = self.entries[: self.k]
        atomic_write_text(self.index_path, json.dumps(self.entries, indent=1))
        return path

    def drop_after(self, step: int) -> None:
        """Forget (and delete) top-k checkpoints of steps after `step`: a resumed run re-evaluates those steps."""
        late = [e for e in self.entries if e["step"] > step]
        if not late:
            return
        for e in late:
            (self.dir / e["path"]).unlink(missing_ok=True)
        self.entries = [e for e in self.entries if e["step"] <= step]
        atomic_write_text(self.index_path, json.dumps(self.entries, indent=1))

    def best(self) -> Path | None:
        """Path of the best checkpoint kept so far, or None."""
        return self.dir / self.entries[0]["path"] if self.entries else None
