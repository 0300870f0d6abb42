"""Data sanity pass at load time: catch data that loads without error but cannot be what was recorded.

:func:`check_dataset` looks at every array a dataset will train on (``data/<key>`` of a replay buffer) and at the
episode boundaries, and returns a :class:`SanityReport` (per-key min/max/mean/std, constant dims, non-finite
counts, image value range, episode lengths) that prints as a one-screen table (``summary()``) and serialises to
JSON (``to_dict()`` / ``save_json()``) for the run directory.

Errors (:class:`DataSanityError`, a ``ValueError``), all listed in one message that names the file and key:

* an action or observation array that is all zeros (typical of a store read with the wrong chunk-key separator,
  or an array that was created but never written: both read back as the fill value 0);
* any non-finite value (NaN, +-inf);
* an image array whose values contradict its dtype: integer images outside 0..255, float images outside
  0..255 (float images are expected in 0..255 or 0..1), any image whose maximum is 0;
* an array with no steps, or whose length differs from ``episode_ends[-1]``.

Warnings (:class:`DataSanityWarning`, via ``warnings.warn``, naming file and key): constant but non-zero
arrays or feature dims (legitimate for e.g. a gripper that never moves, so never an error) and empty episodes.

Cost: low-dim arrays are checked in full; image arrays (and any array over ``max_full_bytes``) on at most
``max_frames`` frames, evenly spaced for in-memory arrays and in evenly spaced contiguous blocks for on-disk
(zarr) arrays, so that only a few chunks are decompressed. Everything is streamed in batches of bounded size.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from shortcut_policy.utils import atomic_write_text

__all__ = ["DataSanityError", "DataSanityWarning", "KeyStats", "SanityReport", "check_dataset"]

_BATCH_ELEMENTS = 1 << 22  # ~4M values per streamed batch (32 MB as float64)
_TOL = 1e-3  # slack on image bounds (float rounding of 0..255 / 0..1 data)


class DataSanityError(ValueError):
    """The data is implausible (all zeros, non-finite, image range contradicting its dtype, ...).

    ``str(e)`` lists every problem, each naming the file, the key and what was expected; ``e.report`` is the
    :class:`SanityReport` (``None`` when raised before one was built).
    """

    def __init__(self, message: str, report: "SanityReport | None" = None):
        super().__init__(message)
        self.report = report


class DataSanityWarning(UserWarning):
    """Suspicious but possibly legitimate data (constant dims, skipped empty or too-short episodes/demos)."""


def _f(x) -> float | None:
    """JSON-able float (NaN / inf -> None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class KeyStats:
    """Statistics of one array over the frames checked.

    ``shape`` is the full array shape (N, ...) with N steps; ``frames_checked`` <= N (subsampled images).
    ``min``/``max``/``mean``/``std`` are over all finite values checked, in the array's own units (None when no
    finite value was seen). ``constant_dims`` are flattened feature indices (low-dim arrays only) whose value never
    changes over the checked frames, ``constant_values`` their values. ``image_range`` is ``"0..255"`` or ``"0..1"``
    for image arrays (None otherwise).
    """

    key: str
    role: str  # "action", "obs" or "image"
    dtype: str
    shape: tuple[int, ...]
    frames_checked: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    nonfinite: int = 0
    first_nonfinite_frame: int | None = None
    all_zero: bool = False
    constant: bool = False
    constant_dims: list[int] = field(default_factory=list)
    constant_values: list[float] = field(default_factory=list)
    image_range: str | None = None

    def to_dict(self) -> dict:
        """The statistics as JSON-ready plain Python values (non-finite floats as None)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        for k in ("min", "max", "mean", "std"):
            d[k] = _f(d[k])
        d["constant_values"] = [_f(v) for v in self.constant_values]
        return d


@dataclass
class SanityReport:
    """Result of :func:`check_dataset` for one file.

    ``episode_length_*`` are in steps; ``errors`` / ``warnings`` are the messages raised / warned (each names
    the file and key).
    """

    source: str
    n_episodes: int
    n_steps: int
    episode_length_min: int | None
    episode_length_median: float | None
    episode_length_max: int | None
    empty_episodes: list[int]
    keys: dict[str, KeyStats]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        """JSON-able dict (floats are Python floats, NaN/inf become None)."""
        return {
            "source": self.source,
            "ok": self.ok,
            "n_episodes": self.n_episodes,
            "n_steps": self.n_steps,
            "episode_length": {
                "min": self.episode_length_min,
                "median": _f(self.episode_length_median),
                "max": self.episode_length_max,
            },
            "empty_episodes": list(self.empty_episodes),
            "keys": {k: s.to_dict() for k, s in self.keys.items()},
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as indented JSON to ``path`` (e.g. ``<run_dir>/data_sanity.json``)."""
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")  # no half file

    def summary(self) -> str:
        """A one-screen table: one row per key (role, dtype, shape, min/max/mean/std, notes), then the problems."""

        def num(x):
            return "-" if x is None else f"{x:.4g}"

        if self.n_episodes:
            ep = (
                f"{self.n_episodes} episodes, {self.n_steps} steps; episode length min {self.episode_length_min} / "
                f"median {self.episode_length_median:g} / max {self.episode_length_max}"
            )
        else:
            ep = "0 episodes"
        lines = [f"data sanity: {self.source} ({ep})"]
        header = ("key", "role", "dtype", "shape", "min", "max", "mean", "std", "notes")
        rows = []
        for s in self.keys.values():
            notes = []
            if s.frames_checked < (s.shape[0] if s.shape else 0):
                notes.append(f"{s.frames_checked}/{s.shape[0]} frames checked")
            if s.image_range:
                notes.append(f"range {s.image_range}")
            if s.nonfinite:
                notes.append(f"{s.nonfinite} NON-FINITE")
            if s.all_zero:
                notes.append("ALL ZERO")
            elif s.constant:
                notes.append("constant")
            elif s.constant_dims:
                notes.append(f"constant dims {_short(s.constant_dims)}")
            rows.append(
                (
                    s.key,
                    s.role,
                    s.dtype,
                    "x".join(map(str, s.shape)),
                    num(s.min),
                    num(s.max),
                    num(s.mean),
                    num(s.std),
                    "; ".join(notes),
                )
            )
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        for r in [header] + rows:
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        lines.append(f"  errors: {len(self.errors)}, warnings: {len(self.warnings)}")
        for m in self.errors:
            lines.append(f"  ERROR   {m}")
        for m in self.warnings:
            lines.append(f"  warning {m}")
        for m in self.notes:
            lines.append(f"  note    {m}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _short(items: list, n: int = 8) -> str:
    """At most ``n`` items of a list as "[a, b, ...] (N in all)" for messages."""
    shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]" + (f" ({len(items)} in all)" if len(items) > n else "")


def _frame_batches(a, n: int, max_frames: int, subsample: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (frame indices, batch of those frames) covering the frames to check, each batch of bounded size."""
    per_frame = max(1, int(np.prod(a.shape[1:], dtype=np.int64)))
    batch = max(1, _BATCH_ELEMENTS // per_frame)
    if not subsample or n <= max_frames:
        for s in range(0, n, batch):
            e = min(s + batch, n)
            yield np.arange(s, e), np.asarray(a[s:e])
        return
    if isinstance(a, np.ndarray):  # in memory: evenly spaced single frames
        idx = np.unique(np.linspace(0, n - 1, max_frames).round().astype(np.int64))
        for s in range(0, len(idx), batch):
            yield idx[s : s + batch], a[idx[s : s + batch]]
        return
    # on disk (zarr): evenly spaced contiguous blocks, so that few chunks are decompressed
    n_blocks = min(16, max_frames)
    block = max(1, max_frames // n_blocks)
    starts = np.unique(np.linspace(0, n - block, n_blocks).round().astype(np.int64))
    for s0 in starts:
        for s in range(int(s0), int(s0) + block, batch):
            e = min(s + batch, int(s0) + block, n)
            if e > s:
                yield np.arange(s, e), np.asarray(a[s:e])


def _stats(key: str, a, role: str, max_frames: int, max_full_bytes: int) -> KeyStats:
    """:class:`KeyStats` of one array ``a`` (N, ...) with the given role: min / max / mean / std (per dim unless it is
    an image), non-finite counts, constant dims, all-zero and image-range checks. Images and arrays larger than
    ``max_full_bytes`` are checked on about ``max_frames`` frames."""
    shape = tuple(int(v) for v in a.shape)
    n = shape[0]
    dtype = np.dtype(a.dtype)
    itemsize = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    subsample = role == "image" or n * itemsize > max_full_bytes
    per_dim = role != "image"
    st = KeyStats(key=key, role=role, dtype=str(dtype), shape=shape, frames_checked=0)
    if n == 0:
        return st
    is_float = dtype.kind in "fc"
    count = 0
    total = 0.0
    total_sq = 0.0
    gmin = math.inf
    gmax = -math.inf
    dmin = dmax = None
    for frames, x in _frame_batches(a, n, max_frames, subsample):
        st.frames_checked += x.shape[0]
        x = x.reshape(x.shape[0], -1)
        if dtype.kind == "b":
            x = x.astype(np.uint8)
        if is_float:
            fin = np.isfinite(x)
            bad = x.size - int(fin.sum())
            if bad:
                if st.first_nonfinite_frame is None:
                    st.first_nonfinite_frame = int(frames[np.flatnonzero(~fin.all(axis=1))[0]])
                st.nonfinite += bad
                if not fin.any():
                    continue
                x = np.where(fin, x, np.nan)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN
                    bmin, bmax = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
                xs = x[fin].astype(np.float64)
            else:
                bmin, bmax = x.min(axis=0), x.max(axis=0)
                xs = x.astype(np.float64, copy=False).ravel()
        else:
            bmin, bmax = x.min(axis=0), x.max(axis=0)
            xs = x.astype(np.float64).ravel()
        count += xs.size
        total += float(xs.sum())
        total_sq += float(np.dot(xs, xs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            gmin = min(gmin, float(np.nanmin(bmin)))
            gmax = max(gmax, float(np.nanmax(bmax)))
            if per_dim:
                bmin, bmax = bmin.astype(np.float64), bmax.astype(np.float64)
                dmin = bmin if dmin is None else np.fmin(dmin, bmin)
                dmax = bmax if dmax is None else np.fmax(dmax, bmax)
    if count:
        mean = total / count
        st.min, st.max, st.mean = gmin, gmax, mean
        st.std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
        st.all_zero = gmin == 0 and gmax == 0 and st.nonfinite == 0
        st.constant = gmin == gmax and st.frames_checked > 1
        if per_dim and dmin is not None and st.frames_checked > 1 and not st.constant:
            const = np.flatnonzero(dmin == dmax)
            st.constant_dims = [int(i) for i in const]
            st.constant_values = [float(dmin[i]) for i in const]
    return st


def check_dataset(
    arrays: Mapping[str, Any],
    episode_ends,
    source: str,
    image_keys: Iterable[str] = (),
    *,
    action_keys: Iterable[str] = ("action",),
    max_frames: int = 2000,
    max_full_bytes: int = 256 * 1024**2,
    raise_errors: bool = True,
    warn: bool = True,
) -> SanityReport:
    """Check the arrays a dataset trains on; return a :class:`SanityReport`.

    Args:
        arrays: ``{key: array}``, each (N, ...) with N = ``episode_ends[-1]`` steps along dim 0; numpy arrays
            or anything sliceable into numpy along dim 0 (e.g. a ``zarr.Array`` left on disk).
        episode_ends: (E,) int, exclusive end step of each episode (Diffusion Policy's ``meta/episode_ends``).
        source: the file the arrays come from (named in every message).
        image_keys: keys holding images (N, H, W, C): checked for a value range matching their dtype
            (uint8 0..255; other integers and floats expected in 0..255, floats also 0..1) and subsampled to at most
            ``max_frames`` frames.
        action_keys: keys holding actions (role ``"action"`` in the report); every other non-image key is an
            observation. Both roles are errors when all zero.
        max_frames: at most this many frames of an image array (or of an array over ``max_full_bytes``) are read.
        raise_errors: raise :class:`DataSanityError` when there are errors (else just report them).
        warn: emit a :class:`DataSanityWarning` per suspicious key (constant dims, empty episodes).

    Returns:
        The report (also attached to the raised error as ``e.report``).

    Raises:
        DataSanityError: all-zero action/observation arrays, non-finite values, image range contradicting the
            dtype, arrays without steps or whose length differs from ``episode_ends[-1]``.
    """
    source = str(source)
    image_keys = set(image_keys)
    action_keys = set(action_keys)
    ends = np.asarray(episode_ends, dtype=np.int64).reshape(-1)
    lengths = np.diff(ends, prepend=0) if len(ends) else np.zeros((0,), np.int64)
    n_steps = int(ends[-1]) if len(ends) else 0
    empty = [int(i) for i in np.flatnonzero(lengths == 0)]
    nonempty = lengths[lengths > 0]
    report = SanityReport(
        source=source,
        n_episodes=int(len(ends)),
        n_steps=n_steps,
        episode_length_min=int(nonempty.min()) if len(nonempty) else None,
        episode_length_median=float(np.median(nonempty)) if len(nonempty) else None,
        episode_length_max=int(nonempty.max()) if len(nonempty) else None,
        empty_episodes=empty,
        keys={},
    )
    errors, warns = report.errors, report.warnings
    if empty:
        warns.append(f"{source}: episode(s) {_short(empty)} have 0 steps; they hold no data and are skipped")
    for key, a in arrays.items():
        role = "image" if key in image_keys else "action" if key in action_keys else "obs"
        where = f"{source}: data/{key} ({role})"
        if len(a.shape) == 0:
            errors.append(f"{where} is a scalar; expected an array of shape (N={n_steps}, ...)")
            continue
        st = _stats(key, a, role, max_frames, max_full_bytes)
        report.keys[key] = st
        n = st.shape[0]
        if n != n_steps:
            errors.append(f"{where} has {n} steps but episode_ends[-1]={n_steps}; expected one row per step")
        if n == 0:
            errors.append(f"{where} has no steps; expected recorded {role} data")
            continue
        checked = f"{st.frames_checked} checked frames (of {n})" if st.frames_checked < n else f"all {n} steps"
        if st.nonfinite:
            errors.append(
                f"{where} has {st.nonfinite} non-finite value(s) (NaN/inf; first in frame {st.first_nonfinite_frame}) "
                f"in {checked}; expected finite values"
            )
        if st.all_zero:
            errors.append(
                f"{where} is all zeros over {checked}; expected recorded {role} values (an array that was never "
                "written, or a zarr store read with the wrong chunk-key separator, reads back as its fill value 0)"
            )
        if role == "image" and st.max is not None and not st.all_zero:
            dt = np.dtype(st.dtype)
            if dt == np.uint8:
                st.image_range = "0..255"
            elif dt.kind in "iu":
                st.image_range = "0..255"
                if st.min < 0 or st.max > 255:
                    st.image_range = "invalid"
                    errors.append(f"{where}: integer image values span [{st.min:g}, {st.max:g}]; expected 0..255")
            elif dt.kind == "f":
                st.image_range = "0..1" if st.max <= 1.0 + _TOL else "0..255"
                if st.min < -_TOL or st.max > 255.0 + _TOL:
                    st.image_range = "invalid"
                    errors.append(f"{where}: float image values span [{st.min:g}, {st.max:g}]; expected 0..255 or 0..1")
                elif st.max <= 0:
                    errors.append(f"{where}: float image maximum is {st.max:g}; expected 0..255 or 0..1")
            else:
                errors.append(f"{where}: image dtype {dt} is not numeric; expected uint8 or float")
        if st.all_zero or st.nonfinite:
            continue
        if st.constant:
            warns.append(
                f"{where} is constant ({st.min:g}) over {checked}: it carries no information "
                "(legitimate e.g. for a fixed gripper; otherwise check how the data was recorded)"
            )
        elif st.constant_dims:
            dims = st.constant_dims
            vals = st.constant_values
            warns.append(
                f"{where}: {len(dims)} of {int(np.prod(st.shape[1:], dtype=np.int64))} feature dims are constant over "
                f"{checked}: dims {_short(dims)} = {_short(vals)} (legitimate e.g. for a fixed gripper)"
            )
    if warn:
        for m in warns:
            warnings.warn(m, DataSanityWarning, stacklevel=2)
    if errors and raise_errors:
        raise DataSanityError(
            f"{source}: implausible data ({len(errors)} problem(s)):\n  - " + "\n  - ".join(errors), report
        )
    return report
