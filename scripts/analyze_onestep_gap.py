"""Where do 1-step action chunks differ from N-step chunks of the same policy? (Push-T, one checkpoint)

Rolls the policy out at `--ref-steps` (the better sampler) on validation seeds, records every observation window
it acts on together with the block's coverage at that moment, then samples K chunks per window at 1 step and at
`--ref-steps` from the SAME noise and reports, by phase of the episode (coverage bins; > 0.8 is final alignment):

- spread: std over the K samples (pixels, averaged over the executed actions and both axes); a much smaller 1-step
  spread means mode averaging (the 1-step map collapses the distribution towards its mean);
- bias: distance between the mean 1-step chunk and the mean N-step chunk (pixels);
- paired: mean distance between the 1-step and the N-step chunk drawn from the same noise (pixels);
- and, from rollouts at both step counts, the near-miss share (episodes whose best coverage is in [0.90, 0.95],
  i.e. aligned but not precisely enough) and the chunk-boundary jump (pixels between the last action of a chunk and
  the first of the next).

usage: python scripts/analyze_onestep_gap.py CKPT [--ref-steps 8] [--seeds 20] [--seed-start 200000] [--k 16]
Writes a JSON next to the checkpoint's run (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from shortcut_policy.eval.rollout import make_env
from shortcut_policy.policy import load_policy

BINS = [(0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.01)]


def rollout(policy, task, seed: int, steps: int, record: bool):
    env = make_env(task)
    obs, info = env.reset(seed=seed)
    windows, covers, boundary, prev_last = [], [], [], None
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    while not env.done:
        cov = float(env.unwrapped.coverage)
        if record:
            windows.append({k: np.asarray(v)[None].copy() for k, v in obs.items()})
            covers.append(cov)
        act = policy.predict_action({k: np.asarray(v)[None] for k, v in obs.items()}, steps=steps, generator=g)[0]
        if prev_last is not None:
            boundary.append(float(np.linalg.norm(act[0] - prev_last)))
        prev_last = act[-1]
        obs, _, _, _, info = env.step(act)
        best = max(best, float(info.get("max_reward", 0.0)))
    return windows, covers, boundary, best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--ref-steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--seed-start", type=int, default=200000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(a.checkpoint)
    task = policy.task_cfg
    stats = {s: {"best": [], "boundary": []} for s in (1, a.ref_steps)}
    windows, covers = [], []
    for seed in range(a.seed_start, a.seed_start + a.seeds):
        for s in (1, a.ref_steps):
            w, c, b, best = rollout(policy, task, seed, s, record=(s == a.ref_steps))
            stats[s]["best"].append(best)
            stats[s]["boundary"] += b
            if s == a.ref_steps:
                windows += w
                covers += c
    per_bin = {f"{lo:.2f}-{hi:.2f}": {"spread_1": [], "spread_ref": [], "bias": [], "paired": []} for lo, hi in BINS}
    for obs, cov in zip(windows, covers):
        batch = {k: np.repeat(v, a.k, axis=0) for k, v in obs.items()}
        g1 = torch.Generator().manual_seed(len(per_bin) * 7919 + int(cov * 1e6))
        state = g1.get_state()
        a1 = policy.predict_action(batch, steps=1, generator=g1)
        g1.set_state(state)
        an = policy.predict_action(batch, steps=a.ref_steps, generator=g1)
        key = next(f"{lo:.2f}-{hi:.2f}" for lo, hi in BINS if lo <= cov < hi)
        d = per_bin[key]
        d["spread_1"].append(float(a1.std(0).mean()))
        d["spread_ref"].append(float(an.std(0).mean()))
        d["bias"].append(float(np.linalg.norm(a1.mean(0) - an.mean(0), axis=-1).mean()))
        d["paired"].append(float(np.linalg.norm(a1 - an, axis=-1).mean()))
    result = {
        "checkpoint": a.checkpoint,
        "ref_steps": a.ref_steps,
        "seeds": [a.seed_start, a.seed_start + a.seeds - 1],
        "k": a.k,
        "bins": {},
        "rollouts": {},
    }
    print(
        f"{'coverage':>10} {'n':>5} {'spread@1':>9} {'spread@' + str(a.ref_steps):>9} {'bias px':>8} {'paired px':>9}"
    )
    for key, d in per_bin.items():
        if not d["bias"]:
            continue
        row = {k: float(np.mean(v)) for k, v in d.items()}
        row["n"] = len(d["bias"])
        result["bins"][key] = row
        print(
            f"{key:>10} {row['n']:>5} {row['spread_1']:>9.2f} {row['spread_ref']:>9.2f} {row['bias']:>8.2f} "
            f"{row['paired']:>9.2f}"
        )
    for s, st in stats.items():
        best = np.array(st["best"])
        result["rollouts"][str(s)] = {
            "success": float((best >= 1.0).mean()),
            "near_miss_0.90_0.95": float(((best >= 0.90 / 0.95) & (best < 1.0)).mean()),
            "mean_score": float(best.mean()),
            "boundary_jump_px": float(np.mean(st["boundary"])),
        }
        r = result["rollouts"][str(s)]
        print(
            f"rollouts @{s}: success {r['success']:.2f}, near misses {r['near_miss_0.90_0.95']:.2f}, "
            f"mean score {r['mean_score']:.3f}, chunk-boundary jump {r['boundary_jump_px']:.2f} px"
        )
    out = Path(a.out) if a.out else Path(a.checkpoint).parent.parent / "onestep_gap.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
