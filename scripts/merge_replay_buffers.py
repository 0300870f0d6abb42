"""Concatenate zarr ReplayBuffers (same keys and per-step shapes) into one new buffer.

    python scripts/merge_replay_buffers.py OUT.zarr IN1.zarr IN2.zarr [...] [--overwrite]

Episodes keep their order (all of IN1, then IN2, ...). The output is written to a temporary directory and renamed
into place (ReplayBuffer.save_to_path); an existing OUT is replaced only with --overwrite. Used to train Transport on
clean plus DART-style demonstrations (docs/results/transport.md).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from shortcut_policy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError


def merge(inputs, out, overwrite: bool = False) -> ReplayBuffer:
    if len(inputs) < 2:
        raise ValueError(f"merge: need at least two input buffers, got {list(inputs)}")
    bufs = [ReplayBuffer.copy_from_path(p) for p in inputs]
    keys = sorted(bufs[0].keys())
    for path, rb in zip(inputs[1:], bufs[1:]):
        if sorted(rb.keys()) != keys:
            raise ReplayBufferError(f"{path}: keys {sorted(rb.keys())} differ from {inputs[0]}'s {keys}")
        for k in keys:
            if rb[k].shape[1:] != bufs[0][k].shape[1:]:
                raise ReplayBufferError(
                    f"{path}: data/{k} has per-step shape {rb[k].shape[1:]}, {inputs[0]} has {bufs[0][k].shape[1:]}"
                )
    offsets = np.cumsum([0] + [rb.n_steps for rb in bufs[:-1]])
    ends = np.concatenate([rb.episode_ends + off for rb, off in zip(bufs, offsets)])
    merged = ReplayBuffer.from_arrays(
        {k: np.concatenate([rb[k] for rb in bufs]) for k in keys}, ends, source=" + ".join(map(str, inputs))
    )
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
