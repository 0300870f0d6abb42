"""``shortcut-policy convert src=DIR out=PATH.zarr [keys=null overwrite=false]`` (configs/convert.yaml): a local
LeRobot dataset folder written as Diffusion Policy's zarr layout (:func:`shortcut_policy.datasets.lerobot.
convert_lerobot_to_zarr`): episode by episode with a progress bar, into a temporary sibling renamed onto ``out`` only
when complete. RESULT: out, episodes, frames, fps, features, seconds."""

from __future__ import annotations

import time
from pathlib import Path

from ..datasets.lerobot import convert_lerobot_to_zarr

__all__ = ["convert_command"]


def convert_command(cfg, run_dir) -> dict:
    """Convert ``src`` (a LeRobot folder) to the zarr ``out`` (default ``<src>.zarr``). Raises ``ValueError`` without
    ``src``, ``FileExistsError`` for an existing ``out`` without ``overwrite=true``, and the reader's
    ``LeRobotFormatError`` (naming the file and key) for missing or inconsistent metadata."""
    if not cfg.get("src"):
        raise ValueError("convert: src=DIR (a LeRobot dataset folder) is required")
    src = Path(str(cfg.src))
    if not src.is_dir():
        raise FileNotFoundError(f"convert: src={str(src)!r}: no such folder (a local LeRobot dataset)")
    out = Path(str(cfg.out)) if cfg.get("out") else src.with_name(src.name.rstrip("/") + ".zarr")
    keys = list(cfg["keys"]) if cfg.get("keys") else None
    t = time.perf_counter()
    res = convert_lerobot_to_zarr(
        src,
        out,
        keys=keys,
        overwrite=bool(cfg.get("overwrite", False)),
        progress=bool(cfg.get("progress", True)),
        zarr_format=int(cfg.get("zarr_format", 2)),
    )
    res["seconds"] = time.perf_counter() - t
    return res
