"""``shortcut-policy fid checkpoint=PATH | samples_dir=DIR resolution=R [steps=[1,4,128] num_samples=N ref_stats=...]``
(configs/fid.yaml): FID of a checkpoint's samples at each number of sampling steps, or of an image folder, against
reference statistics (:mod:`shortcut_policy.eval.fid`)."""

from __future__ import annotations

from ..conventions import M
from ..eval.fid import feature_statistics, folder_features, frechet_distance, get_extractor, reference_stats
from ..generator import load_generator, sample_images
from ..utils import resolve_device

__all__ = ["fid_command"]


def fid_command(cfg, run_dir) -> dict:
    """FID of a checkpoint's samples (at each of ``steps``) or of an image folder (``samples_dir``)."""
    device = resolve_device(cfg.get("device", "auto"))
    extractor = get_extractor(cfg.get("inception_path"), device=device, batch_size=int(cfg.get("batch_size", 50)))
    result: dict = {"extractor": extractor.name}
    if cfg.get("samples_dir"):
        resolution = cfg.get("resolution")
        if resolution is None:
            raise ValueError("samples_dir needs resolution=<image size the reference statistics use>")
        mu, sigma, meta, path = reference_stats(
            extractor,
            int(resolution),
            cfg.get("ref_stats"),
            cfg.get("ref_dir"),
            cfg.get("stats_cache_dir", "data/fid_stats"),
            max_items=cfg.get("ref_max_items"),
        )
        feats = folder_features(cfg.samples_dir, extractor, int(resolution), max_items=cfg.get("num_samples"))
        result.update(
            {
                "fid": frechet_distance(*feature_statistics(feats), mu, sigma),
                "n_samples": len(feats),
                "ref_stats": str(path),
                "n_ref": meta.get("count"),
            }
        )
        return result
    if not cfg.get("checkpoint"):
        raise ValueError("fid needs checkpoint=<path> (samples generated here) or samples_dir=<image folder>")
    gen, ckpt_cfg = load_generator(cfg.checkpoint, device=device, weights=cfg.get("weights", "auto"))
    resolution = int(cfg.get("resolution") or gen.image_size)
    mu, sigma, meta, path = reference_stats(
        extractor,
        resolution,
        cfg.get("ref_stats"),
        cfg.get("ref_dir"),
        cfg.get("stats_cache_dir", "data/fid_stats"),
        max_items=cfg.get("ref_max_items"),
    )
    if resolution != gen.image_size:
        raise ValueError(f"generator makes {gen.image_size}px images, FID resolution is {resolution}")
    result.update({"ref_stats": str(path), "n_ref": meta.get("count"), "n_samples": int(cfg.num_samples)})
    runs = [(int(s), None) for s in cfg.get("steps", [1, 4, M])]
    if cfg.get("cfg_scale") is not None:  # guidance only at N = M: fewer steps distilled it
        runs.append((int(gen.max_steps), float(cfg.cfg_scale)))
    for steps, scale in runs:
        x = sample_images(
            gen,
            int(cfg.num_samples),
            steps,
            seed=int(cfg.get("seed", 42)),
            cfg_scale=scale,
            batch_size=int(cfg.get("sample_batch_size", 64)),
            device=device,
        )
        key = f"fid@{steps}" + (f"_cfg{scale:g}" if scale is not None else "")
        result[key] = frechet_distance(*feature_statistics(extractor(x)), mu, sigma)
        print(f"{key} = {result[key]:.3f}", flush=True)
    return result
