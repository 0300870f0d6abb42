"""Fixed-length windows over a ReplayBuffer, with Diffusion Policy's indexing, padding and splits.

Per episode of length L, a window of ``sequence_length`` T starts at every s in [-pad_before, L - T + pad_after]
(``pad_before``/``pad_after`` clamped to [0, T-1]), so an episode yields L - T + pad_before + pad_after + 1
windows (none if that is <= 0). Frames before the episode start / after its end are filled by repeating the
first / last frame of the *same* episode (edge replication); no window crosses an episode boundary.

Each index row is (buffer_start, buffer_end, sample_start, sample_end): rows [buffer_start, buffer_end) of
the buffer land at positions [sample_start, sample_end) of the window.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numba
import numpy as np

__all__ = ["create_indices", "get_val_mask", "downsample_mask", "SequenceSampler"]


@numba.njit(cache=True)
def _create_indices(episode_ends, sequence_length, episode_mask, pad_before, pad_after):
    """Numba kernel of :func:`create_indices`: (n, 4) int64 rows (buffer_start, buffer_end, sample_start, sample_end)
    for every window of ``sequence_length`` steps in the masked episodes, windows allowed to hang ``pad_before``
    steps over an episode's start and ``pad_after`` over its end. Two passes: count, then fill."""
    n_rows = 0
    for i in range(len(episode_ends)):
        if not episode_mask[i]:
            continue
        start = 0 if i == 0 else episode_ends[i - 1]
        length = episode_ends[i] - start
        n = length - sequence_length + pad_after + pad_before + 1
        if n > 0:
            n_rows += n
    out = np.empty((n_rows, 4), dtype=np.int64)
    r = 0
    for i in range(len(episode_ends)):
        if not episode_mask[i]:
            continue
        start = 0 if i == 0 else episode_ends[i - 1]
        length = episode_ends[i] - start
        for idx in range(-pad_before, length - sequence_length + pad_after + 1):
            buffer_start = max(idx, 0) + start
            buffer_end = min(idx + sequence_length, length) + start
            out[r, 0] = buffer_start
            out[r, 1] = buffer_end
            out[r, 2] = buffer_start - (idx + start)  # frames padded at the front
            out[r, 3] = sequence_length - ((idx + sequence_length + start) - buffer_end)
            r += 1
    return out


def create_indices(
    episode_ends: np.ndarray,
    sequence_length: int,
    episode_mask: np.ndarray | None = None,
    pad_before: int = 0,
    pad_after: int = 0,
) -> np.ndarray:
    """(n_windows, 4) int64 rows (buffer_start, buffer_end, sample_start, sample_end), episodes in order."""
    episode_ends = np.asarray(episode_ends, dtype=np.int64)
    if sequence_length < 1:
        raise ValueError(f"sequence_length={sequence_length}: expected >= 1")
    if episode_mask is None:
        episode_mask = np.ones(len(episode_ends), dtype=bool)
    episode_mask = np.asarray(episode_mask, dtype=bool)
    if episode_mask.shape != episode_ends.shape:
        raise ValueError(
            f"episode_mask has shape {episode_mask.shape}, expected {episode_ends.shape} (one flag per episode)"
        )
    pad_before = min(max(int(pad_before), 0), sequence_length - 1)
    pad_after = min(max(int(pad_after), 0), sequence_length - 1)
    return _create_indices(episode_ends, int(sequence_length), episode_mask, pad_before, pad_after)


def get_val_mask(n_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of validation episodes: max(1, round(n * ratio)) episodes (at most n - 1) drawn with
    ``np.random.default_rng(seed).choice(n, size, replace=False)``, as Diffusion Policy does."""
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio <= 0:
        return val_mask
    if val_ratio >= 1:
        raise ValueError(f"val_ratio={val_ratio}: expected a value in [0, 1)")
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    if n_val <= 0:
        return val_mask
    rng = np.random.default_rng(seed=seed)
    val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    return val_mask


def downsample_mask(mask: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Keep at most ``max_n`` of the True entries of ``mask``, chosen with
    ``np.random.default_rng(seed).choice(n_true, max_n, replace=False)`` (Diffusion Policy's rule)."""
    mask = np.asarray(mask, dtype=bool)
    if max_n is None or int(mask.sum()) <= int(max_n):
        return mask.copy()
    if int(max_n) < 0:
        raise ValueError(f"max_n={max_n}: expected >= 0 or None")
    current = np.nonzero(mask)[0]
    rng = np.random.default_rng(seed=seed)
    chosen = current[rng.choice(len(current), size=int(max_n), replace=False)]
    out = np.zeros_like(mask)
    out[chosen] = True
    return out


class SequenceSampler:
    """Windows of ``sequence_length`` steps over any object with ``episode_ends`` and ``__getitem__(key)``
    returning arrays that share dim 0 (a ReplayBuffer, numpy or zarr backed).

    ``key_first_k={key: k}`` reads only the first k frames of a window for that key (the rest are NaN, 0 for
    integer arrays), to skip decoding unused observation frames.

    Without padding, a numpy-backed sample is a view into the buffer: copy before modifying it in place.
    """

    def __init__(
        self,
        replay_buffer,
        sequence_length: int,
        pad_before: int = 0,
        pad_after: int = 0,
        keys: Iterable[str] | None = None,
        key_first_k: Mapping[str, int] | None = None,
        episode_mask: np.ndarray | None = None,
    ):
        self.replay_buffer = replay_buffer
        self.sequence_length = int(sequence_length)
        all_keys = list(replay_buffer.keys())
        self.keys = list(all_keys if keys is None else keys)
        missing = [k for k in self.keys if k not in all_keys]
        if missing:
            raise KeyError(f"SequenceSampler: keys {missing} not in the replay buffer (has {sorted(all_keys)})")
        self.key_first_k = dict(key_first_k or {})
        bad = [k for k in self.key_first_k if k not in self.keys]
        if bad:
            raise KeyError(f"SequenceSampler: key_first_k names {bad}, which are not sampled keys {self.keys}")
        ends = np.asarray(replay_buffer.episode_ends)
        if episode_mask is None:
            episode_mask = np.ones(len(ends), dtype=bool)
        self.episode_mask = np.asarray(episode_mask, dtype=bool)
        self.indices = create_indices(ends, self.sequence_length, self.episode_mask, pad_before, pad_after)
        self._arrays = {k: replay_buffer[k] for k in self.keys}

    def __len__(self) -> int:
        return len(self.indices)

    def sample_sequence(self, idx: int) -> dict[str, np.ndarray]:
        """Window ``idx`` as {key: (sequence_length, ...) array}: the episode's frames, the first / last frame
        repeated where the window hangs over the episode's start / end (Diffusion Policy's padding). Keys in
        ``key_first_k`` read only their first k frames (the rest NaN, or 0 for integer arrays)."""
        buffer_start, buffer_end, sample_start, sample_end = (int(v) for v in self.indices[idx])
        T = self.sequence_length
        out = {}
        for key in self.keys:
            arr = self._arrays[key]
            if key in self.key_first_k:
                n = buffer_end - buffer_start
                k = min(int(self.key_first_k[key]), n)
                fill = np.nan if np.dtype(arr.dtype).kind in "fc" else 0
                sample = np.full((n,) + tuple(arr.shape[1:]), fill, dtype=arr.dtype)
                sample[:k] = arr[buffer_start : buffer_start + k]
            else:
                sample = np.asarray(arr[buffer_start:buffer_end])
            if sample_start > 0 or sample_end < T:
                data = np.empty((T,) + tuple(arr.shape[1:]), dtype=arr.dtype)
                data[:sample_start] = sample[0]
                data[sample_end:] = sample[-1]
                data[sample_start:sample_end] = sample
                sample = data
            out[key] = sample
        return out
