"""Policy-server overhead: loopback round trip through ``shortcut-policy serve`` against in-process inference, and a
real-time ``deploy policy=remote`` run with its deadline misses.

    python scripts/bench_serve.py --checkpoint runs/train/<run>/checkpoints/<best>.ckpt \\
        [--calls 1000] [--deploy-steps 300] [--hz 10] [--steps 1] [--threads 1] [--out bench_serve.json]

1. The server runs in its own process (``shortcut-policy serve checkpoint=... port=0``, as on a GPU machine), the
   client here. In-process calls (``predict_action`` at batch 1, the ``deploy`` policy function) and remote calls
   (``RemotePolicy.infer``: encode, loopback TCP, decode, validate, the same inference in the server, reply) are
   interleaved in rounds of 50 on the same observation (a real frame of the simulated robot), ``--calls`` of each in
   the same run; reported: p50 / p99 / mean of both in ms, the server's own inference time, and the overhead
   (remote - in-process) at p50 and p99.
2. ``deploy policy=remote`` on the simulated robot of the checkpoint's task at ``--hz`` for ``--deploy-steps`` cycles
   (async mode): deadline misses, jitter, round trip.

Prints one JSON document (also written to ``--out``). Run it on an idle machine: both figures are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _pcts(x) -> dict:
    """p50 / p99 / mean of seconds ``x`` in ms."""
    a = 1e3 * np.asarray(x, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def start_server(checkpoint: str, steps: int, threads: int, run_dir: Path, timeout: float = 300.0):
    """``shortcut-policy serve`` in a subprocess on a free loopback port; returns (process, port)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "shortcut_policy.cli",
        "serve",
        f"checkpoint={checkpoint}",
        "port=0",
        f"steps={steps}",
        f"torch_threads={threads}",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"on tcp://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("the policy server did not start:\n" + "".join(lines)[-3000:])


def stop_server(proc) -> dict:
    """SIGTERM the server and return its RESULT."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    last = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(last[-1][len("RESULT ") :]) if last else {"error": err[-2000:]}


def main(argv=None) -> dict:
    """Run both measurements; returns (and prints) the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--calls", type=int, default=1000, help="in-process and remote calls each (p50/p99 over them)")
    ap.add_argument("--deploy-steps", type=int, default=300, help="control cycles of the remote deploy (0: skip)")
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (NFE)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from shortcut_policy import cli
    from shortcut_policy.deploy.loop import make_policy_fn
    from shortcut_policy.deploy.server import RemotePolicy
    from shortcut_policy.deploy.sim_robot import make_sim_robot
    from shortcut_policy.policy import load_policy

    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint, device="cpu")
    task = dict(policy.task_cfg)
    robot_cfg = {"kind": "sim", "name": f"sim_{task['env']}", "env": task["env"], "obs_type": task.get("obs_type")}
    robot_cfg = {k: v for k, v in robot_cfg.items() if v is not None}
    robot = make_sim_robot(robot_cfg, n_obs_steps=policy.n_obs_steps, hz=args.hz)
    robot.start(100000)
    obs0 = robot.get_observation()
    robot.close()
    To = policy.n_obs_steps
    obs = {k: np.asarray(obs0[k])[-To:] for k in task["obs_shapes"]}
    remote_obs = {**obs, "timestamp": np.asarray(obs0["timestamp"], dtype=np.float64)[-To:]}
    local_fn = make_policy_fn(policy, args.steps, seed=0)

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    proc, port = start_server(args.checkpoint, args.steps, args.threads, tmp / "serve")
    result: dict = {
        "checkpoint": str(args.checkpoint),
        "task": task.get("name"),
        "objective": type(policy.objective).__name__,
        "steps": args.steps,
        "threads": args.threads,
        "load_avg_1min_start": os.getloadavg()[0],
    }
    try:
        with RemotePolicy(f"127.0.0.1:{port}", timeout_s=30, connect_timeout_s=60) as client:
            client.hello()
            for _ in range(5):  # warm-up both paths
                local_fn(obs)
                client.infer(remote_obs, steps=args.steps)
            client.round_trip_s.clear()
            client.server_inference_s.clear()
            local_s: list[float] = []
            rounds = max(1, args.calls // 50)
            per = [args.calls // rounds + (1 if i < args.calls % rounds else 0) for i in range(rounds)]
            for n in per:  # interleaved: both paths see the same machine load
                for _ in range(n):
                    t = time.perf_counter()
                    local_fn(obs)
                    local_s.append(time.perf_counter() - t)
                for _ in range(n):
                    client.infer(remote_obs, steps=args.steps)
            remote_s = list(client.round_trip_s)
            server_s = list(client.server_inference_s)
            ping = [client.ping() for _ in range(min(args.calls, 200))]
        loc, rem = _pcts(local_s), _pcts(remote_s)
        result["round_trip"] = {
            "calls": len(remote_s),
            "in_process": loc,
            "remote": rem,
            "server_inference": _pcts(server_s),
            "ping": _pcts(ping),
            "overhead_p50_ms": rem["p50_ms"] - loc["p50_ms"],
            "overhead_p99_ms": rem["p99_ms"] - loc["p99_ms"],
        }
        if args.deploy_steps > 0:
            res = cli.run_verb(
                "deploy",
                [
                    "policy=remote",
                    f"policy.address=127.0.0.1:{port}",
                    f"robot=sim_{task['env']}",
                    *([f"robot.obs_type={task['obs_type']}"] if task.get("obs_type") else []),
                    f"hz={args.hz:g}",
                    f"steps={args.steps}",
                    f"n_steps={args.deploy_steps}",
                    "mode=async",
                    f"torch_threads={args.threads}",
                    "status=false",
                    f"run_dir={tmp / 'deploy'}",
                ],
            )
            keep = (
                "cycles",
                "deadline_misses",
                "skipped_ticks",
                "startup_ticks",
                "stale_dropped",
                "chunks",
                "jitter_p50_ms",
                "jitter_p99_ms",
                "inference_p50_ms",
                "inference_p99_ms",
                "round_trip_p50_ms",
                "round_trip_p99_ms",
                "server_inference_p50_ms",
                "server_inference_p99_ms",
                "mean_score",
                "hz",
                "mode",
            )
            result["deploy"] = {k: res.get(k) for k in keep}
    finally:
        result["server"] = stop_server(proc)
        result["load_avg_1min_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
