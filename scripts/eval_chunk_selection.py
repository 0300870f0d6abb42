"""Does choosing among several 1-step chunks help? Backward-coherence selection (Bidirectional Decoding, Liu et al.
2024, arXiv 2408.17355, its "backward coherence" criterion only) on one policy checkpoint.

At every replanning step the policy samples N chunks for the same observation in ONE batched network call (NFE
stays the sampler's step count, the batch is N) and executes the chunk whose future actions agree best with the
not-yet-executed tail of the chunk it chose last time: the squared distance, in normalised action units, between
the new window's steps To-1 .. H-Ta-1 and the previous window's steps To-1+Ta .. H-1 (the env steps both cover).
The first chunk of an episode is the first candidate. N = 1 is the plain policy on the same noise stream, so the
two figures of one invocation per N compare like with like.

Episodes run one seed at a time (the selection keeps per-episode state), each seeded with the evaluation's rule
(NumPy and torch seeded with the seed), so figures differ slightly from `shortcut-policy eval`'s batched noise
stream; compare N = 1 and N > 1 from this script only.

usage: python scripts/eval_chunk_selection.py CKPT [--candidates 16] [--steps 1] [--seed-start 200000]
       [--episodes 50] [--out FILE.json]
Prints one RESULT line (success rate with its Wilson interval, mean score) and writes it to --out when given.
Measured in docs/results/pusht_policies_60min.md ("What was tried").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from shortcut_policy.eval.report import wilson_interval
from shortcut_policy.eval.rollout import _seed_policy_rng, run_policy
from shortcut_policy.policy import load_policy
from shortcut_policy.utils import atomic_write_text


class CoherentSelection:
    """Wraps a :class:`~shortcut_policy.policy.Policy` for one episode at a time: ``predict_action(obs, steps)``
    with obs {key: (1, T >= To, ...)} returns (1, Ta, Da) actions in environment units, chosen among ``candidates``
    samples by backward coherence with the previously chosen window (module docstring). Raises ``ValueError`` for a
    batch larger than 1."""

    def __init__(self, policy, candidates: int):
        if candidates < 1:
            raise ValueError(f"--candidates {candidates}: expected >= 1")
        self.policy, self.candidates, self.prev = policy, int(candidates), None

    def reset(self) -> None:
        self.prev = None

    def check_steps(self, steps):
        return self.policy.check_steps(steps)

    @torch.no_grad()
    def predict_action(self, obs, steps):
        p = self.policy
        to, ta, h = p.n_obs_steps, p.n_action_steps, p.horizon
        o = {
            k: torch.as_tensor(np.asarray(v), dtype=torch.float32)[:, -to:]
            for k, v in obs.items()
            if k in p.obs_encoder.obs_shapes
        }
        if next(iter(o.values())).shape[0] != 1:
            raise ValueError("CoherentSelection runs one episode at a time (batch 1)")
        o = {k: v.repeat_interleave(self.candidates, 0) for k, v in o.items()}
        cond = p.obs_encoder(p.normalizer.normalize(o))
        x0 = torch.randn(self.candidates, h, p.action_dim)
        windows = p.objective.sample(p.net, x0, cond, steps=steps).clamp(-1.0, 1.0)  # (N, H, Da), normalised
        if self.prev is None:
            i = 0
        else:
            dist = ((windows[:, to - 1 : h - ta] - self.prev[None, to - 1 + ta :]) ** 2).sum((1, 2))
            i = int(dist.argmin())
        self.prev = windows[i]
        action = p.normalizer.unnormalize({"action": windows[i : i + 1]})["action"]
        return action[:, to - 1 : to - 1 + ta].numpy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed-start", type=int, default=200000, help="validation seeds by default (never test seeds)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    policy = load_policy(a.checkpoint)
    policy.eval()
    sel = CoherentSelection(policy, a.candidates)
    t0, rows = time.time(), []
    for seed in range(a.seed_start, a.seed_start + a.episodes):
        _seed_policy_rng(seed)
        rows += run_policy(sel, policy.task_cfg, [seed], 1, a.steps, progress=False)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} episodes did not run, first: seed {bad[0]['seed']}: {bad[0]['error']}")
    k = sum(bool(r["success"]) for r in rows)
    lo, hi = wilson_interval(k, len(rows))
    res = {
        "checkpoint": str(a.checkpoint),
        "candidates": a.candidates,
        "steps": a.steps,
        "seed_start": a.seed_start,
        "episodes": len(rows),
        "success_rate": k / len(rows),
        "wilson95": [lo, hi],
        "mean_score": float(np.mean([r["max_reward"] for r in rows])),
        "seconds": round(time.time() - t0, 1),
    }
    print("RESULT " + json.dumps(res), flush=True)
    if a.out is not None:
        atomic_write_text(a.out, json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
