"""Metric logging: a JSON-lines file in the run directory, plus wandb (offline by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from ..utils import atomic_write_text


class Logger:
    """Metrics of a run: one JSON object per line in ``<run_dir>/logs.jsonl`` and, with ``logger.kind=wandb``, wandb
    (offline unless ``WANDB_MODE`` / ``logger.mode`` say otherwise; the run id is the run directory's name, so a
    resumed run appends). ``enabled=False`` (non-zero DDP ranks) makes every method a no-op. Raises ``ValueError``
    for an unknown ``logger.kind``."""

    def __init__(self, run_dir, cfg=None, logger_cfg=None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "logs.jsonl"
        self.wandb = None
        kind = (logger_cfg or {}).get("kind", "none") if logger_cfg is not None else "none"
        if enabled and kind == "wandb":
            mode = os.environ.get("WANDB_MODE") or logger_cfg.get("mode", "offline")
            import wandb  # lazy: wandb (slow to import, only for logger=wandb)

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=logger_cfg.get("project", "shortcut_policy"),
                entity=logger_cfg.get("entity"),
                mode=mode,
                dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None,
                resume="allow",
                id=Path(run_dir).name.replace("/", "_")[-64:] or None,
            )
        elif enabled and kind not in ("none", "wandb"):
            raise ValueError(f"logger.kind={kind!r}: expected 'wandb' or 'none'")

    def log(self, metrics: dict, step: int) -> None:
        """Append ``{"step": step, **metrics}`` to logs.jsonl (only int, float and str values; wandb gets all)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a killed attempt's steps past its last checkpoint), atomically."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def finish(self):
        """Close the wandb run, if any (the JSON-lines file needs no closing)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
