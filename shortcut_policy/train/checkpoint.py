"""The top-k checkpoints of a training run (:class:`TopK`). The checkpoint file format, :func:`save_checkpoint` and
:func:`load_checkpoint` are in :mod:`shortcut_policy.checkpoint` (re-exported here)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from ..utils import atomic_write_text

__all__ = ["FORMAT_VERSION", "TopK", "load_checkpoint", "save_checkpoint"]


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
