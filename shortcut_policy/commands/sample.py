"""``shortcut-policy sample checkpoint=PATH [steps=[1,4,128] num_images=64 cfg_scale=S labels=[...]]``
(configs/sample.yaml): PNG grids of an image checkpoint at each number of sampling steps, from the same noise."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..conventions import M, check_steps
from ..datasets.images import make_grid, write_image
from ..generator import load_generator, sample_images
from ..utils import resolve_device

__all__ = ["sample_command"]


def sample_command(cfg, run_dir) -> dict:
    """PNG grids at each of ``steps`` (default 1, 4, 128) from the same noise and labels, from a checkpoint."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.get("device", "auto"))
    gen, ck_cfg = load_generator(cfg.checkpoint, device=device, weights=cfg.get("weights", "auto"))
    n, nrow = int(cfg.get("num_images", 64)), int(cfg.get("nrow", 8))
    steps_list = [check_steps(int(s), gen.max_steps) for s in cfg.get("steps", [1, 4, M])]
    if cfg.get("labels") is not None:
        base = [int(v) for v in cfg.labels]
        labels = torch.tensor([base[i % len(base)] for i in range(n)])
    elif gen.class_conditional:  # classes 0, 1, 2, ... cycled
        labels = torch.arange(n) % gen.num_classes
    else:
        labels = torch.zeros(n, dtype=torch.long)
    result: dict = {"checkpoint": str(cfg.checkpoint), "num_images": n, "grids": {}}
    runs = [(s, None) for s in steps_list]
    if cfg.get("cfg_scale") is not None:
        runs.append((gen.max_steps, float(cfg.cfg_scale)))
    for steps, scale in runs:
        t0 = time.time()
        x = sample_images(
            gen,
            n,
            steps,
            seed=int(cfg.get("seed", 0)),
            labels=labels,
            cfg_scale=scale,
            batch_size=int(cfg.get("batch_size", 64)),
        )
        dt = time.time() - t0
        tag = f"{steps}steps" + (f"_cfg{scale:g}" if scale is not None else "")
        path = run_dir / f"grid_{tag}.png"
        write_image(path, make_grid(x, nrow=nrow))
        if cfg.get("save_images", False):
            d = run_dir / f"samples_{tag}"
            d.mkdir(exist_ok=True)
            for i in range(n):
                write_image(d / f"{i:06d}.png", x[i])
        result["grids"][tag] = str(path)
        result[f"seconds@{tag}"] = round(dt, 3)
        result[f"nfe@{tag}"] = steps * (2 if scale not in (None, 1.0) else 1)
        print(f"{tag}: {path} ({dt:.2f}s)", flush=True)
    return result
