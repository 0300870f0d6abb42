"""Push-T env throughput: single-process env steps per second for each observation type.

    .venv/bin/python scripts/bench_pusht_env.py [--steps 3000] [--obs state keypoints image]

Random targets in [50, 450]^2 (contacts happen now and then); resets on termination/truncation are
included in the time. Prints one JSON line per obs type and a final RESULT line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def bench(obs_type: str, n_steps: int, seed: int = 0) -> dict:
    from shortcut_policy.envs.pusht import PushTEnv

    env = PushTEnv(obs_type=obs_type)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    targets = rng.uniform(50, 450, size=(n_steps, 2))
    env.step(targets[0])  # warm-up (imports, caches)
    t0 = time.perf_counter()
    c0 = time.process_time()
    resets = 0
    for k in range(n_steps):
        _, _, term, trunc, _ = env.step(targets[k])
        if term or trunc:
            env.reset(seed=seed + k)
            resets += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "obs_type": obs_type,
        "steps": n_steps,
        "steps_per_s_wall": round(n_steps / wall, 1),
        "steps_per_s_cpu": round(n_steps / cpu, 1),
        "resets": resets,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--obs", nargs="+", default=["state", "keypoints", "image"])
    args = ap.parse_args(argv)
    out = {}
    for ot in args.obs:
        r = bench(ot, args.steps)
        print(json.dumps(r), flush=True)
        out[f"{ot}_steps_per_s_cpu"] = r["steps_per_s_cpu"]
        out[f"{ot}_steps_per_s_wall"] = r["steps_per_s_wall"]
    print("RESULT " + json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
