#!/usr/bin/env python
"""Env steps per second of TwoArmTransport (robosuite 1.5.1 + MuJoCo), low-dim and with 1, 2 and 4 cameras.

    MUJOCO_GL=egl PYOPENGL_PLATFORM=egl nice python scripts/bench_transport_env.py [--lowdim-steps 400]
        [--image-steps 60] [--cameras 1,2,4] [--out data/transport_logs/bench_env.json]

The camera counts take the first n of the image task's cameras (shouldercamera0, robot0_eye_in_hand,
shouldercamera1, robot1_eye_in_hand), 84x84, plus the 6 robot low-dim keys: the env renders only the cameras a
policy's observation keys name, so this is the evaluation cost of a policy that uses n cameras.

Actions are small random world-frame deltas (the arms wander, objects stay put), one env, one process; the
first 20 steps are warm-up (numba JIT of robosuite, GL context). Also times ``reset()`` (hard reset rebuilds
the MuJoCo model) and one 128x128 ``render()``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402

from shortcut_policy.utils import emit_benchmark_json  # noqa: E402


def bench(obs_keys, n_steps, enable_render=False, seed=0):
    from shortcut_policy.envs.transport import TransportEnv

    t0 = time.perf_counter()
    env = TransportEnv(obs_keys=obs_keys, enable_render=enable_render)
    t_make = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    env.reset(seed=100000)
    t_reset = time.perf_counter() - t0
    for _ in range(20):
        env.step(rng.uniform(-0.2, 0.2, 14))
    t0 = time.perf_counter()
    for _ in range(n_steps):
        env.step(rng.uniform(-0.2, 0.2, 14))
    dt = time.perf_counter() - t0
    out = {
        "obs_keys": list(obs_keys),
        "steps": n_steps,
        "steps_per_s": n_steps / dt,
        "make_s": t_make,
        "reset_s": t_reset,
    }
    if enable_render:
        t0 = time.perf_counter()
        for _ in range(10):
            frame = env.render()
        out["render_128_ms"] = (time.perf_counter() - t0) / 10 * 1000
        out["render_shape"] = list(frame.shape)
    env.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lowdim-steps", type=int, default=400)
    ap.add_argument("--image-steps", type=int, default=60)
    ap.add_argument("--cameras", default="1,2,4", help="camera counts to time (comma-separated, each 1..4)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from shortcut_policy.envs.transport import IMAGE_KEYS, LOWDIM_SHAPES

    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
        "MUJOCO_GL": os.environ.get("MUJOCO_GL"),
        "lowdim": bench(["obs"], args.lowdim_steps, enable_render=True),
    }
    robot_keys = [k for k in LOWDIM_SHAPES if k != "object"]
    counts = [int(c) for c in str(args.cameras).split(",") if c.strip()]
    bad = [c for c in counts if not 1 <= c <= len(IMAGE_KEYS)]
    if bad:
        ap.error(f"--cameras {args.cameras}: counts must be between 1 and {len(IMAGE_KEYS)}, got {bad}")
    if args.image_steps > 0:
        for n in counts:
            res[f"image_{n}cams"] = bench(list(IMAGE_KEYS[:n]) + robot_keys, args.image_steps)
    import mujoco
    import robosuite

    res["versions"] = {"robosuite": robosuite.__version__, "mujoco": mujoco.__version__}
    emit_benchmark_json(res, args.out)


if __name__ == "__main__":
    main()
