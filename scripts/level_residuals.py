"""How closely does each step-size level of a trained shortcut policy fit its own training target?

For every level k of the checkpoint's shortcut objective (d = 2^-k; k = log2 M is the flow-matching level), on one
batch of training windows: t drawn on the level's grid, x_t from fresh noise, and the mean squared difference
(normalised action units) between the net's velocity at (x_t, t, d) and the target that training regresses it onto:
the bootstrap target of the objective (two half steps of the same net at level k + 1, as in training) for k < log2 M,
x1 - x0 at the flow-matching level (a stochastic target: its residual includes the irreducible variance). Small
residuals at every level with a large gap between 1-step and many-step chunks mean the error accumulates along the
chain of levels rather than at d = 1 alone.

usage: python scripts/level_residuals.py CKPT [--batch 1024] [--seed 0] [--out FILE.json]
Prints one line per level and writes the JSON when --out is given. Raises SystemExit for a checkpoint whose objective
is not the shortcut objective.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from shortcut_policy.builders import build_dataset
from shortcut_policy.checkpoint import load_checkpoint
from shortcut_policy.conventions import interpolate, velocity_target
from shortcut_policy.objectives.timesteps import t_on_level_grid
from shortcut_policy.policy import load_policy
from shortcut_policy.train.trainer import infinite_loader


def level_residuals(path: str, batch: int = 1024, seed: int = 0) -> list[dict]:
    """Per-level residuals of checkpoint ``path`` on ``batch`` training windows drawn with ``seed``: a list of
    {level, step_size, mse, rms_px} dicts, level 0 (d = 1) first. ``rms_px``: the RMS residual in action units
    (pixels on Push-T), from the checkpoint's action normaliser (its mean data units per normalised unit)."""
    torch.set_num_threads(1)
    policy = load_policy(path)
    obj, net = policy.objective, policy.net
    if getattr(obj, "name", "") != "shortcut":
        raise SystemExit(f"{path}: objective {getattr(obj, 'name', '?')!r}, expected a shortcut policy")
    cfg = OmegaConf.create(load_checkpoint(path)["cfg"])
    one = policy.normalizer.unnormalize({"action": torch.ones(1, policy.action_dim)})["action"]
    zero = policy.normalizer.unnormalize({"action": torch.zeros(1, policy.action_dim)})["action"]
    units_per_norm = float((one - zero).abs().mean())
    data = next(infinite_loader(build_dataset(cfg, "train"), batch, 0, 1, seed))
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        nobs = policy.normalizer.normalize({k: data["obs"][k] for k in policy.obs_encoder.obs_shapes})
        x1 = policy.normalizer.normalize({"action": data["action"]})["action"]
        cond = policy.obs_encoder(nobs)
        for k in range(obj.log2_m + 1):
            levels = torch.full((x1.shape[0],), k, dtype=torch.long)
            t = t_on_level_grid(levels)
            x0 = torch.randn_like(x1)
            x_t = interpolate(x0, x1, t)
            pred = obj.velocity_net(net)(x_t, t, levels.float(), cond)
            if k < obj.log2_m:
                target = obj.bootstrap_targets(obj.velocity_net(net), x_t, t, levels, cond, None)
            else:
                target = velocity_target(x0, x1)
            mse = float(((pred - target) ** 2).mean())
            out.append({"level": k, "step_size": 2.0**-k, "mse": mse, "rms_px": mse**0.5 * units_per_norm})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = level_residuals(a.checkpoint, a.batch, a.seed)
    for r in rows:
        print(
            f"level {r['level']} (d = 1/{round(1 / r['step_size'])}): mean squared residual {r['mse']:.5f} "
            f"(RMS {r['rms_px']:.1f} px)"
        )
    if a.out:
        Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, "batch": a.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
