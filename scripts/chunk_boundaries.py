"""What the warm start changes at chunk boundaries (Push-T, one checkpoint, in-process rollouts on validation seeds).

For each setting (actions executed per chunk, warm_start tau or none) rolls the 1-step policy out and reports:
- boundary jump: distance (pixels) between the last executed action of a chunk and the first of the next;
- within-chunk step: mean distance between consecutive executed actions inside a chunk (pixels), its reference;
- plan revision: mean distance (pixels) between what the previous chunk planned for the actions the new chunk
  executes and what the new chunk executes (how much each replanning changes the plan);
- success rate and mean score over the seeds.

usage: python scripts/chunk_boundaries.py CKPT [--seeds 50] [--seed-start 200000] [--settings 2:none 2:0.875 ...]
Prints a table and writes JSON to --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from shortcut_policy.eval.rollout import make_env
from shortcut_policy.policy import load_policy


def rollout(policy, task, seed: int, n_act: int, tau: float | None) -> dict:
    """One episode; returns its best score and the per-boundary / per-step distances (pixels)."""
    policy.set_execution_horizon(n_act)
    policy.warm_start = tau
    env = make_env({**task, "n_action_steps": n_act})
    obs, _ = env.reset(seed=seed)
    g = torch.Generator().manual_seed(seed)
    prior, prev_plan, prev_last = None, None, None
    jumps, steps, revisions, best = [], [], [], 0.0
    start = policy.n_obs_steps - 1
    while not env.done:
        batch = {k: np.asarray(v)[None] for k, v in obs.items()}
        act, window = policy.predict_chunk(batch, steps=1, generator=g, prior=prior)
        act = act[0]
        if prev_last is not None:
            jumps.append(float(np.linalg.norm(act[0] - prev_last)))
        if prev_plan is not None:
            revisions.append(float(np.linalg.norm(act - prev_plan, axis=-1).mean()))
        steps += [float(d) for d in np.linalg.norm(np.diff(act, axis=0), axis=-1)]
        prev_last = act[-1]
        nxt = policy.next_prior(window)
        # what this chunk planned for the actions the next chunk will execute (environment units)
        prev_plan = policy.normalizer.unnormalize({"action": nxt})["action"][0, start : start + n_act].numpy()
        prior = nxt if tau is not None else None
        obs, _, _, _, info = env.step(act)
        best = max(best, float(info.get("max_reward", 0.0)))
    return {"best": best, "jumps": jumps, "steps": steps, "revisions": revisions}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--seed-start", type=int, default=200000)
    ap.add_argument("--settings", nargs="+", default=["2:none", "2:0.875", "4:none", "4:0.75"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(a.checkpoint)
    task = policy.task_cfg
    result = {"checkpoint": a.checkpoint, "seeds": [a.seed_start, a.seed_start + a.seeds - 1], "settings": {}}
    print(
        f"{'setting':>12} {'success':>8} {'mean score':>10} {'boundary px':>11} {'in-chunk px':>11} {'revision px':>11}"
    )
    for spec in a.settings:
        n_act, w = spec.split(":")
        tau = None if w == "none" else float(w)
        eps = [rollout(policy, task, s, int(n_act), tau) for s in range(a.seed_start, a.seed_start + a.seeds)]
        best = np.array([e["best"] for e in eps])
        row = {
            "success": float((best >= 1.0).mean()),
            "mean_score": float(best.mean()),
            "boundary_jump_px": float(np.mean([j for e in eps for j in e["jumps"]])),
            "within_chunk_step_px": float(np.mean([j for e in eps for j in e["steps"]])),
            "plan_revision_px": float(np.mean([j for e in eps for j in e["revisions"]])),
        }
        result["settings"][spec] = row
        print(
            f"{spec:>12} {row['success']:>8.2f} {row['mean_score']:>10.3f} {row['boundary_jump_px']:>11.2f} "
            f"{row['within_chunk_step_px']:>11.2f} {row['plan_revision_px']:>11.2f}"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
