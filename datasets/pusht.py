"""Push-T datasets (Diffusion Policy's PushTLowdimDataset / PushTImageDataset) as configurations of
:class:`SequenceDataset`.

Reads DP's ``pusht_cchi_v7_replay.zarr`` unchanged (zarr format 2) and files written in the same layout:
``data/{img (N,96,96,3) 0..255, state (N,5), keypoint (N,9,2), action (N,2)}`` + ``meta/episode_ends``.

obs_type -> obs fields (per step):
  keypoints: ``obs`` (20) = [keypoint flattened (x0,y0,x1,y1,...) (18), agent xy = state[:2]]
  state:     ``obs`` (5)  = state
  image:     ``image`` (3,96,96) float in [0,1] and ``agent_pos`` (2) = state[:2]
"""

from __future__ import annotations

import os
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from shortcut_policy.conventions import HORIZON, N_ACTION_STEPS, N_OBS_STEPS

from .zarr_dataset import SequenceDataset

__all__ = ["PushTDataset", "PUSHT_OBS_TYPES", "write_synthetic_pusht_zarr"]

PUSHT_OBS_TYPES: dict[str, dict] = {
    "keypoints": {"obs_keys": {"obs": ["keypoint", "state[:2]"]}, "image_keys": []},
    "state": {"obs_keys": {"obs": ["state"]}, "image_keys": []},
    "image": {"obs_keys": {"image": ["img"], "agent_pos": ["state[:2]"]}, "image_keys": ["image"]},
}


class PushTDataset(SequenceDataset):
    """Diffusion Policy's Push-T demonstrations (zarr: img, state, keypoint, action) as training windows.

    ``obs_type`` picks the observation: "keypoints" (obs = the 9 block keypoints (18) + agent position (2), in
    pixels), "state" (agent x, y, block x, y, angle) or "image" (the RGB frames ``img`` + agent position). Windows are
    ``horizon`` steps with ``n_obs_steps`` observations and ``n_action_steps`` executed actions (see
    :class:`~shortcut_policy.datasets.zarr_dataset.SequenceDataset` for the splits and the other arguments).
    Raises ``ValueError`` for an unknown ``obs_type``."""

    def __init__(
        self,
        zarr_path: str | os.PathLike,
        obs_type: str = "keypoints",
        horizon: int = HORIZON,
        n_obs_steps: int = N_OBS_STEPS,
        n_action_steps: int = N_ACTION_STEPS,
        val_ratio: float = 0.02,
        max_train_episodes: int | None = None,
        seed: int = 42,
        split: str = "train",
        **kwargs,
    ):
        if obs_type not in PUSHT_OBS_TYPES:
            raise ValueError(f"PushTDataset: unknown obs_type {obs_type!r}; expected one of {sorted(PUSHT_OBS_TYPES)}")
        self.obs_type = obs_type
        cfg = PUSHT_OBS_TYPES[obs_type]
        super().__init__(
            zarr_path,
            obs_keys=cfg["obs_keys"],
            action_keys=["action"],
            image_keys=cfg["image_keys"],
            horizon=horizon,
            n_obs_steps=n_obs_steps,
            n_action_steps=n_action_steps,
            val_ratio=val_ratio,
            max_train_episodes=max_train_episodes,
            seed=seed,
            split=split,
            **kwargs,
        )


def write_synthetic_pusht_zarr(
    path: str | os.PathLike,
    episode_lengths=(30, 25, 41),
    seed: int = 0,
    with_images: bool = True,
    image_size: int = 96,
    chunk_rows: int = 7,
):
    """Write a small random file in exactly the layout of DP's ``pusht_cchi_v7_replay.zarr`` (zarr format 2,
    Blosc zstd bit-shuffle, float32 data, ``img`` 0..255 HWC, int64 ``meta/episode_ends``), directly with
    zarr (not through ReplayBuffer), with deliberately odd chunking. For tests and smoke runs only:
    the values are random, not demonstrations. Refuses an existing path."""
    p = Path(path)
    if p.exists():
        raise FileExistsError(f"{p} already exists")
    rng = np.random.default_rng(seed)
    ends = np.cumsum(np.asarray(episode_lengths, dtype=np.int64))
    n = int(ends[-1])
    state = np.concatenate([rng.uniform(50, 450, (n, 4)), rng.uniform(-10, 10, (n, 1))], axis=1).astype(np.float32)
    data = {
        "state": state,
        "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "n_contacts": rng.integers(0, 3, (n, 1)).astype(np.float32),
    }
    if with_images:
        data["img"] = rng.integers(0, 256, (n, image_size, image_size, 3)).astype(np.float32)
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    root = zarr.open_group(str(p), mode="w", zarr_format=2)
    g = root.create_group("data")
    for k, v in data.items():
        chunks = (
            (chunk_rows,) + v.shape[1:] if k != "img" else (max(1, chunk_rows // 2), image_size, image_size // 2 + 1, 3)
        )
        a = g.create_array(k, shape=v.shape, chunks=chunks, dtype=v.dtype, compressors=blosc)
        a[:] = v
    m = root.create_group("meta")
    e = m.create_array("episode_ends", shape=ends.shape, chunks=(5,), dtype=np.int64, compressors=None)
    e[:] = ends
    return data, ends
