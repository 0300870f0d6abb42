"""One generic windowed dataset over a zarr ReplayBuffer; Push-T, Transport, ... are configurations of it.

Each output field is built from a list of *source specs* naming ``data/<key>`` arrays of the buffer:

* ``"key"``        the array, trailing dims flattened: (N, 9, 2) -> (N, 18)
* ``"key[a:b]"``   then a slice of those flattened features, e.g. ``"state[:2]"`` = agent xy of Push-T

Low-dim fields concatenate their sources in order (float32). Image fields take exactly one source stored
HWC (uint8 or float 0..255) and come out as float32 (n_obs_steps, C, H, W) in [0, 1] (``x / 255``, HWC -> CHW).

The buffer is a zarr ReplayBuffer, or any object with the same read interface (``replay_buffer=``): a robomimic
hdf5 read into memory, a LeRobot folder (:class:`~.lerobot.LeRobotSource`, whose videos are decoded on read: an
image field backed by such an array stays on disk under ``images_in_memory="auto"`` and is decoded per window).

Samples are ``{"obs": {name: (horizon, ...) float32 tensor}, "action": (horizon, Da) float32 tensor}``, except
that image fields hold only the first ``n_obs_steps`` frames, (n_obs_steps, C, H, W): the policy encodes no later
frame, and reading, converting and normalising all ``horizon`` frames took a third of an image policy's training
step (measured on the Push-T image recipe). Windows are
as in Diffusion Policy (pad_before = n_obs_steps - 1 + n_latency_steps, pad_after = n_action_steps - 1, edge
padding, never across episodes). Split: ``get_val_mask(n, val_ratio, seed)``, train = the rest downsampled to
``max_train_episodes`` with ``downsample_mask(..., seed)``; ``split="val"`` is the complement of train (so
episodes dropped by the downsampling are validation episodes, as in DP); ``split="all"`` uses every episode.
The normalizer is fit on the whole buffer.

Load-time checks: every ``data/<key>`` the dataset uses goes through :func:`~.sanity.check_dataset` (all-zero
actions/observations, non-finite values and image ranges contradicting their dtype raise ``DataSanityError``;
constant dims warn) and the report is kept as ``dataset.sanity_report`` (``summary()`` / ``to_dict()``). Episodes
too short for one window are skipped with a ``DataSanityWarning`` naming them; a train (or ``"all"``) split with
no window at all raises ``ValueError`` explaining the episode lengths against the window.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from shortcut_policy.conventions import HORIZON, N_ACTION_STEPS, N_OBS_STEPS

from .normalizer import LinearNormalizer, SingleFieldLinearNormalizer
from .replay_buffer import ReplayBuffer
from .sampler import SequenceSampler, downsample_mask, get_val_mask
from .sanity import DataSanityWarning, check_dataset

__all__ = ["SequenceDataset", "parse_source", "DEFAULT_IMAGE_MEMORY_BYTES"]

DEFAULT_IMAGE_MEMORY_BYTES = 4 * 1024**3  # "auto": image arrays up to this size are loaded into memory
_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*$")
_SPLITS = ("train", "val", "all")


def parse_source(spec: str) -> tuple[str, slice]:
    """``"state[:2]"`` -> ("state", slice(None, 2)); ``"keypoint"`` -> ("keypoint", slice(None))."""
    m = _SPEC.match(str(spec))
    if not m:
        raise ValueError(f"bad source spec {spec!r}: expected 'key' or 'key[start:stop]' (e.g. 'state[:2]')")
    key, a, b = m.groups()
    return key, slice(int(a) if a else None, int(b) if b else None)


def _as_list(v) -> list[str]:
    """A key spec as a list of strings (one string becomes a one-element list)."""
    if isinstance(v, str):
        return [v]
    return [str(s) for s in v]


class _Fields:
    """What SequenceSampler needs: episode_ends, keys(), __getitem__ (numpy or zarr arrays, same length)."""

    def __init__(self, arrays: dict, episode_ends: np.ndarray):
        self._arrays = arrays
        self.episode_ends = episode_ends

    def keys(self):
        """Names of the fields (observation fields as "obs/<name>", then "action")."""
        return list(self._arrays)

    def __getitem__(self, k):
        return self._arrays[k]


class SequenceDataset(Dataset):
    """Windows of ``horizon`` steps over a zarr ReplayBuffer (see the module docstring for fields and splits).

    Raises:
        FileNotFoundError / ReplayBufferError: the file is missing or not in the Diffusion Policy layout.
        KeyError: a ``data/<key>`` named by ``obs_keys`` / ``action_keys`` is not in the file.
        DataSanityError (ValueError): implausible data (see :mod:`.sanity`); the message names file and key.
        ValueError: bad arguments, or a train/"all" split that yields no window (the message gives the episode
            lengths against the window length).
    """

    def __init__(
        self,
        zarr_path: str | os.PathLike | None = None,
        *,
        obs_keys: Mapping[str, Sequence[str] | str],
        action_keys: Sequence[str] | str = ("action",),
        image_keys: Sequence[str] = (),
        horizon: int = HORIZON,
        n_obs_steps: int = N_OBS_STEPS,
        n_action_steps: int = N_ACTION_STEPS,
        n_latency_steps: int = 0,
        val_ratio: float = 0.02,
        max_train_episodes: int | None = None,
        seed: int = 42,
        split: str = "train",
        normalizer_modes: Mapping[str, Any] | None = None,
        images_in_memory: bool | str = "auto",
        replay_buffer: ReplayBuffer | None = None,
    ):
        if (zarr_path is None) == (replay_buffer is None):
            raise ValueError("SequenceDataset: give exactly one of zarr_path or replay_buffer")
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: expected one of {_SPLITS}")
        if horizon < 1 or n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError(
                f"horizon={horizon}, n_obs_steps={n_obs_steps}, n_action_steps={n_action_steps}: expected >= 1"
            )
        if n_obs_steps + n_latency_steps > horizon:
            raise ValueError(f"n_obs_steps={n_obs_steps} (+ latency {n_latency_steps}) exceeds horizon={horizon}")
        if not obs_keys:
            raise ValueError("SequenceDataset: obs_keys is empty")
        image_keys = list(image_keys)
        unknown_img = [k for k in image_keys if k not in obs_keys]
        if unknown_img:
            raise ValueError(f"image_keys {unknown_img} are not obs fields {list(obs_keys)}")
        if "action" in obs_keys:
            raise ValueError("an obs field may not be named 'action' (it would clash with the action normalizer field)")

        self.horizon, self.n_obs_steps, self.n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        self.n_latency_steps = int(n_latency_steps)
        self.val_ratio, self.max_train_episodes, self.seed, self.split = val_ratio, max_train_episodes, seed, split
        self.image_keys = image_keys
        self.obs_sources = {name: [parse_source(s) for s in _as_list(v)] for name, v in obs_keys.items()}
        self.action_sources = [parse_source(s) for s in _as_list(action_keys)]
        self.normalizer_modes = dict(normalizer_modes or {})
        for name in image_keys:
            if len(self.obs_sources[name]) != 1 or self.obs_sources[name][0][1] != slice(None):
                raise ValueError(f"image field {name!r} needs exactly one unsliced source, got {obs_keys[name]!r}")

        # ---- read the buffer: low-dim sources into memory, images into memory or left on disk
        needed = sorted(
            {k for srcs in self.obs_sources.values() for k, _ in srcs} | {k for k, _ in self.action_sources}
        )
        if replay_buffer is None:
            disk = ReplayBuffer.open(zarr_path, mode="r")
            source = str(zarr_path)
        else:
            disk = replay_buffer
            source = replay_buffer.source
        missing = [k for k in needed if k not in disk]
        if missing:
            raise KeyError(
                f"{source}: data key(s) {missing} needed by the dataset are not in the file (has {sorted(disk.keys())})"
            )
        self.source = source
        image_src = {self.obs_sources[n][0][0] for n in image_keys}
        arrays: dict[str, Any] = {}
        loaded: dict[str, Any] = {}

        def load(key):
            if key not in loaded:
                a = disk[key]
                if key in image_src and not self._images_fit(disk, image_src, images_in_memory):
                    loaded[key] = a  # stays a zarr array (read per window)
                else:
                    loaded[key] = np.asarray(a[:])
            return loaded[key]

        for name, srcs in self.obs_sources.items():
            if name in image_keys:
                img = load(srcs[0][0])
                if img.ndim != 4 or img.shape[-1] not in (1, 3, 4):
                    raise ValueError(
                        f"{source}: image source data/{srcs[0][0]} must be (N, H, W, C) with C in 1/3/4, "
                        f"got {tuple(img.shape)}"
                    )
                arrays["obs/" + name] = img
            else:
                arrays["obs/" + name] = self._concat(load, srcs, source, name)
        arrays["action"] = self._concat(load, self.action_sources, source, "action")
        self._episode_ends = np.asarray(disk.episode_ends, dtype=np.int64)
        # ---- sanity pass over the data/<key> arrays used (images: at most 2000 frames) -> self.sanity_report
        lazy = any(getattr(a, "decoded_on_read", False) for a in loaded.values())
        self.sanity_report = check_dataset(
            loaded,
            self._episode_ends,
            source,
            image_keys=image_src,
            action_keys={k for k, _ in self.action_sources},
            max_frames=256 if lazy else 2000,  # frames decoded on read (video): a smaller sample at load
        )
        for key in sorted(image_src):
            st = self.sanity_report.keys.get(key)
            if st is not None and st.image_range == "0..1" and np.dtype(st.dtype).kind == "f":
                msg = (
                    f"{source}: data/{key} (image) is a float image in 0..1 (max {st.max:g}), but this dataset "
                    "expects images stored 0..255 and divides them by 255: its frames will be nearly black"
                )
                self.sanity_report.warnings.append(msg)
                warnings.warn(msg, DataSanityWarning, stacklevel=2)
        self._fields = _Fields(arrays, self._episode_ends)
        # image fields decoded on read (LeRobot videos / encoded images), kept on disk and decoded per window (like
        # every image field, only the window's To observation frames are read: key_first_k in _make_sampler)
        self.lazy_image_keys = [n for n in image_keys if getattr(arrays["obs/" + n], "decoded_on_read", False)]

        # ---- split and windows
        n_ep = len(self._episode_ends)
        val_mask = get_val_mask(n_ep, val_ratio, seed)
        self.train_mask = downsample_mask(~val_mask, max_train_episodes, seed)
        mask = {"train": self.train_mask, "val": ~self.train_mask, "all": np.ones(n_ep, bool)}[split]
        self._make_sampler(mask)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _images_fit(disk, image_src, images_in_memory) -> bool:
        """Whether to load the image arrays into memory: ``images_in_memory`` when it is a bool, else ("auto") when
        the buffer already is in memory or the images take at most ``DEFAULT_IMAGE_MEMORY_BYTES``. Raises
        ``ValueError`` for another value."""
        if isinstance(images_in_memory, bool):
            return images_in_memory
        if images_in_memory != "auto":
            raise ValueError(f"images_in_memory={images_in_memory!r}: expected True, False or 'auto'")
        if any(getattr(disk[k], "decoded_on_read", False) for k in image_src):
            return False  # videos: decoded per window in the loader workers, never copied whole
        if disk.backend == "numpy":
            return True
        total = sum(int(np.prod(disk[k].shape)) * np.dtype(disk[k].dtype).itemsize for k in image_src)
        return total <= DEFAULT_IMAGE_MEMORY_BYTES

    @staticmethod
    def _concat(load, srcs, source, name) -> np.ndarray:
        """One float32 field (N, D) from source keys with feature slices ``srcs`` [(key, slice)], each flattened after
        the time dim and concatenated. Raises ``ValueError`` when a slice selects no feature."""
        parts = []
        for key, sl in srcs:
            a = load(key)
            flat = np.asarray(a).reshape(a.shape[0], -1)[:, sl]
            if flat.shape[1] == 0:
                raise ValueError(f"{source}: field {name!r}: source data/{key}{_fmt(sl)} selects no features")
            parts.append(flat.astype(np.float32, copy=False))
        return np.ascontiguousarray(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])

    def _make_sampler(self, mask: np.ndarray) -> None:
        """Index the windows of the episodes in ``mask`` (padding To - 1 + latency steps before an episode, Ta - 1
        after it, as Diffusion Policy)."""
        self.episode_mask = np.asarray(mask, dtype=bool)
        pad_before = self.n_obs_steps - 1 + self.n_latency_steps
        pad_after = self.n_action_steps - 1
        self.sampler = SequenceSampler(
            self._fields,
            sequence_length=self.horizon,
            pad_before=pad_before,
            pad_after=pad_after,
            # image fields: only the To observation frames are read (the policy encodes no later frame)
            key_first_k={"obs/" + n: self.n_obs_steps for n in self.image_keys},
            episode_mask=self.episode_mask,
        )
        self._check_windows(pad_before, pad_after)

    def min_episode_length(self) -> int:
        """Steps an episode needs to yield at least one window: horizon - pad_before - pad_after (>= 1), with
        pad_before = n_obs_steps - 1 + n_latency_steps and pad_after = n_action_steps - 1 (each at most horizon - 1)."""
        H = self.horizon
        pb = min(max(self.n_obs_steps - 1 + self.n_latency_steps, 0), H - 1)
        pa = min(max(self.n_action_steps - 1, 0), H - 1)
        return max(1, H - pb - pa)

    def _check_windows(self, pad_before: int, pad_after: int) -> None:
        """Warn about selected episodes too short for a window; raise when a train/all split has no window."""
        need = self.min_episode_length()
        lengths = np.diff(self._episode_ends, prepend=0)
        selected = np.flatnonzero(self.episode_mask)
        short = selected[lengths[selected] < need]
        window = (
            f"a window is horizon={self.horizon} steps, of which up to pad_before={pad_before} "
            f"(n_obs_steps - 1 + n_latency_steps) repeat an episode's first frame and up to pad_after={pad_after} "
            f"(n_action_steps - 1) its last, so an episode needs at least {need} steps"
        )
        if len(self.sampler) == 0 and self.split != "val":
            if len(selected) == 0:
                raise ValueError(
                    f"{self.source}: no training windows: split {self.split!r} selects 0 of {len(lengths)} episodes "
                    f"(val_ratio={self.val_ratio}, max_train_episodes={self.max_train_episodes})"
                )
            sl = lengths[selected]
            raise ValueError(
                f"{self.source}: no training windows: all {len(selected)} {self.split!r} episode(s) are too short. "
                f"{window[0].upper()}{window[1:]}; these episodes have {int(sl.min())}..{int(sl.max())} steps "
                f"(median {float(np.median(sl)):g}). Use longer episodes, or a shorter horizon / more padding "
                "(n_obs_steps, n_action_steps)."
            )
        if len(short):
            desc = ", ".join(f"{int(i)} ({int(lengths[i])} steps)" for i in short[:20])
            more = f", ... ({len(short)} in all)" if len(short) > 20 else ""
            warnings.warn(
                f"{self.source}: {len(short)} of {len(selected)} {self.split!r} episode(s) are shorter than a window "
                f"and are skipped ({window}): episode {desc}{more}",
                DataSanityWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ public API
    def get_validation_dataset(self) -> "SequenceDataset":
        """Windows over the episodes not used for training (shares the loaded arrays)."""
        val = copy.copy(self)
        val.split = "val"
        val._make_sampler(~self.train_mask)
        return val

    def get_normalizer(self, **modes: str) -> LinearNormalizer:
        """Fit on the whole buffer: low-dim obs + action in 'limits' mode unless ``normalizer_modes`` (or
        ``modes``) says otherwise; image fields in the fixed [0,1] -> [-1,1] mode."""
        override = {**self.normalizer_modes, **modes}
        normalizer = LinearNormalizer()
        for name in self.obs_sources:
            if name in self.image_keys:
                normalizer[name] = SingleFieldLinearNormalizer.create_image()
            else:
                normalizer.fit({name: self._fields["obs/" + name]}, mode=override.get(name, "limits"))
        normalizer.fit({"action": self._fields["action"]}, mode=override.get("action", "limits"))
        return normalizer

    def get_all_actions(self) -> torch.Tensor:
        """Every action of the buffer (N, Da) as a float32 tensor (all episodes, not only this split)."""
        return torch.from_numpy(np.array(self._fields["action"]))

    @property
    def n_episodes(self) -> int:
        return len(self._episode_ends)

    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends

    @property
    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-step shape of each obs field as returned (images (C, H, W))."""
        out = {}
        for name in self.obs_sources:
            a = self._fields["obs/" + name]
            out[name] = (a.shape[3], a.shape[1], a.shape[2]) if name in self.image_keys else tuple(a.shape[1:])
        return out

    @property
    def action_dim(self) -> int:
        return int(self._fields["action"].shape[1])

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: int) -> dict:
        sample = self.sampler.sample_sequence(idx)
        obs = {}
        for name in self.obs_sources:
            x = sample["obs/" + name]
            if name in self.image_keys:
                x = x[: self.n_obs_steps]  # only these frames were read (and, from videos, decoded)
                hwc = np.moveaxis(x, -1, -3)  # (T, C, H, W) view
                x = np.empty(hwc.shape, dtype=np.float32)
                np.divide(hwc, np.float32(255.0), out=x, casting="unsafe")  # one pass: cast, transpose, scale
            else:
                x = np.array(x, dtype=np.float32)  # copy: never hand out views of the buffer
            obs[name] = torch.from_numpy(np.ascontiguousarray(x))
        action = torch.from_numpy(np.array(sample["action"], dtype=np.float32))
        return {"obs": obs, "action": action}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, split={self.split}, windows={len(self)}, "
            f"episodes={int(self.episode_mask.sum())}/{self.n_episodes}, obs={self.obs_shapes}, "
            f"action_dim={self.action_dim})"
        )


def _fmt(sl: slice) -> str:
    """A slice as "[a:b]" for messages."""
    return f"[{'' if sl.start is None else sl.start}:{'' if sl.stop is None else sl.stop}]"
