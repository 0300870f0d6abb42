"""Concatenate zarr ReplayBuffers (same keys and per-step shapes) into one new buffer.

    python scripts/merge_replay_buffers.py OUT.zarr IN1.zarr IN2.zarr [...] [--overwrite]

Episodes keep their order (all of IN1, then IN2, ...). The output is written to a temporary directory and renamed
into place (ReplayBuffer.save_to_path); an existing OUT is replaced only with --overwrite. Used to train Transport on
clean plus DART-style demonstrations (docs/results/transport.md).
"""
from __future__ import annotations

import argparse
import sys

from shortcut_policy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError


def merge(inputs, out, overwrite: bool = False) -> ReplayBuffer:
    if len(inputs) < 2:
        raise ValueError(f"merge: need at least two input buffers, got {list(inputs)}")
    merged = ReplayBuffer.create_empty_numpy()
    keys = None
    for path in inputs:
        rb = ReplayBuffer.copy_from_path(path)
        if keys is None:
            keys = sorted(rb.keys())
        elif sorted(rb.keys()) != keys:
            raise ReplayBufferError(f"{path}: keys {sorted(rb.keys())} differ from the first input's {keys}")
        for i in range(rb.n_episodes):
            merged.add_episode(rb.get_episode(i, copy=True))
    merged.save_to_path(out, overwrite=overwrite)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    rb = merge(a.inputs, a.out, a.overwrite)
    print(f"RESULT out={a.out} n_episodes={rb.n_episodes} n_steps={rb.n_steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
