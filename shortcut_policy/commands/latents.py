"""``shortcut-policy latents task=<image task> [out=PATH vae_path=DIR space=latent|pixel max_items=N]``
(configs/latents.yaml): encode a task's images once into a zarr store (latents with a VAE, or pixels) that
training reads instead of encoding every step (:mod:`shortcut_policy.datasets.latents`)."""

from __future__ import annotations

import time

from ..conventions import VAE_LATENT_SCALE
from ..datasets.latents import encode_dataset, items_source, load_vae
from ..utils import resolve_device

__all__ = ["latents_command"]


def latents_command(cfg, run_dir) -> dict:
    """Encode ``task``'s images (latent or pixel space) into ``out`` (default ``task.latents_path``)."""
    task = cfg.task
    space = cfg.get("space") or task.get("space", "latent")
    out = cfg.get("out") or task.get("latents_path")
    if not out:
        raise ValueError("no output path: set out=... or task.latents_path")
    device = resolve_device(cfg.get("device", "auto"))
    vae, vae_path = None, None
    if space == "latent":
        vae_path = cfg.get("vae_path") or task.get("vae_path")
        if not vae_path:
            raise ValueError("latent mode needs vae_path=... (a local diffusers AutoencoderKL directory)")
        vae = load_vae(vae_path, device)
    ds = items_source(task, cfg.get("max_items"))
    t0 = time.time()
    attrs = encode_dataset(
        ds,
        out,
        space=space,
        vae=vae,
        vae_path=vae_path,
        scale=float(task.get("latent_scale", VAE_LATENT_SCALE)),
        flip=bool(cfg.get("flip", True)),
        batch_size=int(cfg.get("batch_size", 32)),
        shard_size=int(cfg.get("shard_size", 1024)),
        device=device,
        overwrite=bool(cfg.get("overwrite", False)),
        meta={"task": str(task.get("name", ""))},
    )
    dt = time.time() - t0
    return {
        "out": str(out),
        "count": attrs["count"],
        "space": space,
        "shape": attrs["shape"],
        "seconds": round(dt, 2),
        "images_per_s": round(attrs["count"] / max(dt, 1e-9), 2),
    }
