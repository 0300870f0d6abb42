"""Write a small, portable copy of a trained policy checkpoint for inference (what `make demo` ships).

    python scripts/ship_policy.py SRC.ckpt OUT.ckpt

Keeps what `load_policy` / `eval` / `deploy` / `export` read: the format version, the resolved config, the
evaluation (EMA) weights, the step and the final metrics; drops the online weights, the optimiser, the frozen
teacher of a distillation run and the RNG states. Paths of the machine that trained it (the teacher checkpoint, the
init weights) are kept in the config as a record, they are not read at inference. Written atomically.
"""

from __future__ import annotations

import argparse

from shortcut_policy.checkpoint import load_checkpoint, save_checkpoint


def main() -> None:
    """Parse SRC / OUT and write the inference-only checkpoint; prints its size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    a = ap.parse_args()
    ck = load_checkpoint(a.src)
    payload = {
        "cfg": ck["cfg"],
        "ema": ck["ema"],
        "model": ck["ema"]["model"],  # the online slot holds the EMA weights too (eval_model=online still works)
        "step": ck.get("step"),
        "metrics": ck.get("metrics", {}),
        "best_metrics": ck.get("best_metrics", {}),
        "shipped_from": str(a.src),
    }
    path = save_checkpoint(a.out, payload)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB (step {payload['step']})")


if __name__ == "__main__":
    main()
