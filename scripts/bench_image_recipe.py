#!/usr/bin/env python
"""Loader throughput vs training step rate of an image-policy recipe (default: ``task=pusht_image_cpu``).

    python scripts/bench_image_recipe.py [--task pusht_image_cpu] [--steps 30] [--batches 30]
        [--workers 0,1] [--out docs/results/pusht_image/throughput.json] [extra hydra overrides ...]

Measures, in one process on this machine: (1) the windowed image dataset through a torch ``DataLoader`` at the
recipe's batch size, in samples/s, for each ``--workers`` count (0 = in the main process); (2) full training steps
(``Trainer.train_step``: loss, backward, AdamW, schedule, EMA) of the recipe's policy on batches drawn beforehand,
in steps/s and samples/s. The loader keeps up when its samples/s exceed the training's. Needs the task's data
(``shortcut-policy demos task=pusht n_episodes=200 out=data/pusht_expert.zarr`` writes ``data/img``).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from shortcut_policy.builders import build_dataset, build_policy
from shortcut_policy.cli import compose
from shortcut_policy.train.trainer import Trainer
from shortcut_policy.utils import emit_benchmark_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="pusht_image_cpu")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps (after 3 warm-up steps)")
    ap.add_argument("--batches", type=int, default=30, help="timed loader batches per worker count")
    ap.add_argument("--workers", default="0,1", help="DataLoader worker counts to time (comma-separated)")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    cfg = compose("train", [f"task={args.task}", "logger=none", *overrides])
    threads = int(cfg.train.get("threads") or os.cpu_count())
    torch.set_num_threads(threads)
    bs = int(cfg.train.batch_size)
    ds = build_dataset(cfg, "train")
    res = {
        "task": args.task,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f} at start",
        "torch_threads": threads,
        "batch_size": bs,
        "windows": len(ds),
        "loader": {},
    }
    for w in [int(v) for v in args.workers.split(",") if v.strip()]:
        dl = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=w, drop_last=True, persistent_workers=w > 0)
        it = iter(dl)
        next(it)  # worker start-up and first batch not timed
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        dt = time.perf_counter() - t0
        res["loader"][f"workers={w}"] = {"samples_per_s": args.batches * bs / dt, "batches": args.batches}
        del it, dl
    batches = [b for b, _ in zip(DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True), range(args.steps + 3))]
    policy = build_policy(cfg, ds.get_normalizer())
    n_params = sum(p.numel() for p in policy.parameters())
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's own step: loss, backward, AdamW, schedule, EMA
        trainer = Trainer(policy, cfg, tmp, train_dataset=ds, progress=False)
        step = trainer.train_step
        for b in batches[:3]:
            step(b)
        t0 = time.perf_counter()
        for b in batches[3:]:
            step(b)
        dt = time.perf_counter() - t0
    res["train"] = {
        "steps_per_s": args.steps / dt,
        "samples_per_s": args.steps * bs / dt,
        "parameters": n_params,
        "objective": str(cfg.objective.name),
    }
    emit_benchmark_json(res, args.out)


if __name__ == "__main__":
    main()
