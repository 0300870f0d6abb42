"""LeRobot datasets (a local folder) as a data source of :class:`~.zarr_dataset.SequenceDataset`, and their
conversion to Diffusion Policy's zarr layout.

Layouts read (``meta/info.json`` ``codebase_version``):

* **v3.0**: ``meta/info.json`` (``fps``, ``features``, ``chunks_size``, ``data_path`` / ``video_path`` templates),
  ``meta/episodes/chunk-XXX/file-XXX.parquet`` (one row per episode: ``episode_index``, ``length``,
  ``dataset_from_index`` / ``dataset_to_index``, ``data/chunk_index`` / ``data/file_index`` and, per video key,
  ``videos/<key>/chunk_index`` / ``file_index`` / ``from_timestamp``), ``data/chunk-XXX/file-XXX.parquet`` (frames
  of many episodes), ``videos/<key>/chunk-XXX/file-XXX.mp4`` (many episodes per file; an episode's frame at
  ``timestamp`` t is the video frame at ``from_timestamp + t``).
* **v2.1 / v2.0**: ``meta/episodes.jsonl`` (``episode_index``, ``length``), one parquet per episode
  (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``) and one video per episode and key
  (``videos/chunk-XXX/<key>/episode_XXXXXX.mp4``, frame at ``timestamp``), ``episode_chunk = episode // chunks_size``.

Features: numeric ones (``observation.state``, ``action``, ...) are read from parquet with pyarrow into memory,
``(N, *shape)``; ``video`` features are decoded with PyAV **on read** (random access by timestamp: seek to the
keyframe before the first requested frame, decode forward, take the frame whose presentation time is within
``tolerance_s`` of each request, as LeRobot does), so windows are decoded in the DataLoader's worker processes and
nothing is copied; ``image`` features (PNG/JPEG bytes in parquet) are decoded on read with Pillow. Rows are ordered
by (episode_index, frame_index); episode boundaries become ``episode_ends``.

Checked at load, each an error naming the file and the key: a missing ``meta/info.json`` / episodes metadata / data
or video file, a feature declared in info.json that a data file has no column for, an episode index gap, an
episode whose rows are missing or whose frame indices are not 0..L-1, a length that differs from the metadata,
timestamps not spaced 1/fps, a video shorter than the timestamps of its frames (checked against the container's
duration at load, and again at decode time).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from shortcut_policy.utils import atomic_path

from .replay_buffer import ReplayBuffer

__all__ = [
    "LeRobotFormatError",
    "LeRobotSource",
    "VideoFrames",
    "EncodedImageFrames",
    "is_lerobot_dir",
    "lerobot_obs_keys",
    "convert_lerobot_to_zarr",
    "converted_lerobot_meta",
    "write_video",
    "write_lerobot_dataset",
    "META_KEYS",
]

META_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
_V3_DATA = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_V3_VIDEO = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
_V2_DATA = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
_V2_VIDEO = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
_NUMERIC = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "bool"}
DEFAULT_TOLERANCE_S = 1e-4  # LeRobot's default tolerance between a requested timestamp and the decoded frame's


class LeRobotFormatError(ValueError):
    """A LeRobot folder with missing or inconsistent metadata or data; the message names the file and the key."""

    user_error = True


def is_lerobot_dir(path) -> bool:
    """Whether ``path`` is a folder with ``meta/info.json`` (a LeRobot dataset)."""
    return (Path(path) / "meta" / "info.json").is_file()


def _pq():
    """pyarrow.parquet, imported on first use (the zarr / hdf5 sources do not need it)."""
    import pyarrow.parquet as pq

    return pq


# ---------------------------------------------------------------------------------------------------------
# lazily decoded frames
class _LazyFrames:
    """An (N, H, W, 3) uint8 array-like decoded on read: ``a[i]``, ``a[s:e]``, ``a[[i, j]]``, ``np.asarray(a)``.
    Subclasses implement ``_read(rows) -> (len(rows), H, W, 3)``."""

    decoded_on_read = True  # SequenceDataset keeps such arrays lazy (decoded per window) unless asked otherwise

    def __init__(self, key: str, n: int, height: int, width: int):
        self.key = key
        self.shape = (int(n), int(height), int(width), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        n = self.shape[0]
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + n if int(idx) < 0 else int(idx)
            if not 0 <= i < n:
                raise IndexError(f"{self.key}: frame {idx} out of range ({n} frames)")
            return self._read(np.array([i]))[0]
        if isinstance(idx, slice):
            rows = np.arange(*idx.indices(n))
        else:
            rows = np.asarray(idx)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"{self.key}: frame index out of range ({n} frames)")
        if len(rows) == 0:
            return np.empty((0,) + self.shape[1:], np.uint8)
        return self._read(rows)

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def _read(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


_INHERITED: list = []  # containers a forked process inherited: kept referenced, never closed there


class VideoFrames(_LazyFrames):
    """Frames of one video feature: row r is the frame at ``times[r]`` seconds of ``paths[file_id[r]]``, decoded
    with PyAV when read (random access by timestamp; see the module docstring). Open containers are cached per
    process (at most ``max_open``) and never pickled, so DataLoader workers open their own."""

    def __init__(
        self,
        key: str,
        paths: Sequence[str],
        file_id: np.ndarray,
        times: np.ndarray,
        episodes: np.ndarray,
        height: int,
        width: int,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        max_open: int = 8,
    ):
        super().__init__(key, len(file_id), height, width)
        self.paths = [str(p) for p in paths]
        self.file_id = np.asarray(file_id, dtype=np.int32)
        self.times = np.asarray(times, dtype=np.float64)
        self.episodes = np.asarray(episodes, dtype=np.int64)
        self.tolerance_s = float(tolerance_s)
        self.max_open = int(max_open)
        self._open: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def close(self) -> None:
        """Close the containers this process opened."""
        for c in self._open.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._open = {}

    def _container(self, fid: int):
        """The open container of file ``fid`` (reopened in a new process, least recently used closed first)."""
        if self._pid != os.getpid():  # a forked worker: never use (nor free) the parent's demuxer/decoder state
            _INHERITED.extend(self._open.values())  # freeing them here could wait on threads that do not exist
            self._open, self._pid = {}, os.getpid()
        c = self._open.pop(fid, None)
        if c is None:
            import av

            try:
                c = av.open(self.paths[fid])
            except (OSError, av.FFmpegError) as e:
                raise LeRobotFormatError(f"{self.paths[fid]}: cannot open the video of {self.key!r}: {e}") from None
            if not c.streams.video:
                c.close()
                raise LeRobotFormatError(f"{self.paths[fid]}: no video stream (feature {self.key!r})")
            c.streams.video[0].thread_type = "NONE"  # no decoder threads: one decoder per loader worker, fork-safe
            c.streams.video[0].codec_context.thread_count = 1
            while len(self._open) >= self.max_open:
                old = next(iter(self._open))
                self._open.pop(old).close()
        self._open[fid] = c  # most recently used last
        return c

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows),) + self.shape[1:], np.uint8)
        fids = self.file_id[rows]
        for fid in np.unique(fids):
            sel = np.flatnonzero(fids == fid)
            out[sel] = self._decode(int(fid), rows[sel])
        return out

    def _decode(self, fid: int, rows: np.ndarray) -> np.ndarray:
        """Frames of ``rows`` (all in file ``fid``): seek to the keyframe before the earliest, decode forward and
        match each requested time to the nearest frame within the tolerance."""
        times = self.times[rows]
        order = np.argsort(times, kind="stable")
        qs = times[order]
        tol = self.tolerance_s
        c = self._container(fid)
        stream = c.streams.video[0]
        tb = float(stream.time_base)
        found = self._scan(c, stream, qs, tol, seek=max(qs[0] - tol, 0.0) / tb)
        if found is None:  # the seek landed after the first request (inexact index): decode from the start
            found = self._scan(c, stream, qs, tol, seek=0)
        frames, last_t = found
        missing = [i for i, f in enumerate(frames) if f is None]
        if missing:
            i = missing[0]
            r = int(rows[order[i]])
            where = f"{self.paths[fid]}: video of {self.key!r} (episode {int(self.episodes[r])}, row {r})"
            if last_t is None or qs[i] > last_t + tol:
                raise LeRobotFormatError(
                    f"{where}: no frame at {qs[i]:.4f} s: the video ends with a frame at "
                    f"{'none' if last_t is None else f'{last_t:.4f}'} s, shorter than its frames' timestamps"
                )
            raise LeRobotFormatError(
                f"{where}: no frame within {tol:g} s of timestamp {qs[i]:.4f} s (frames are not where the "
                "timestamps say; the video and the parquet timestamps disagree)"
            )
        out = np.empty((len(rows),) + self.shape[1:], np.uint8)
        for i, f in enumerate(frames):
            if f.shape != self.shape[1:]:
                raise LeRobotFormatError(
                    f"{self.paths[fid]}: a frame of {self.key!r} is {f.shape[1]}x{f.shape[0]}, expected "
                    f"{self.shape[2]}x{self.shape[1]} (the size of the dataset's first video)"
                )
            out[order[i]] = f
        return out

    @staticmethod
    def _scan(container, stream, qs: np.ndarray, tol: float, seek):
        """Decode from the keyframe before ``seek`` (in time-base units) and assign the nearest frame to each
        sorted request time in ``qs``. Returns (frames (list, None where no frame matched), last decoded frame
        time), or None when the first decoded frame is already past the first request."""
        container.seek(int(seek), stream=stream, backward=True, any_frame=False)
        frames: list = [None] * len(qs)
        i = 0
        prev_t, prev_f, prev_arr = None, None, None
        first = True
        last_t = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            ft = float(frame.pts * frame.time_base)
            last_t = ft
            if first:
                first = False
                if ft > qs[0] + tol and seek > 0:
                    return None
            cur_arr = None
            while i < len(qs) and qs[i] <= ft:
                # the request lies between the previous frame and this one: the nearer one, if within tolerance
                if prev_t is not None and (qs[i] - prev_t) <= (ft - qs[i]):
                    if qs[i] - prev_t <= tol:
                        if prev_arr is None:
                            prev_arr = prev_f.to_ndarray(format="rgb24")
                        frames[i] = prev_arr
                elif ft - qs[i] <= tol:
                    if cur_arr is None:
                        cur_arr = frame.to_ndarray(format="rgb24")
                    frames[i] = cur_arr
                i += 1
            if i == len(qs):
                break
            prev_t, prev_f, prev_arr = ft, frame, cur_arr
        while i < len(qs):  # requests after the last decoded frame
            if prev_t is not None and qs[i] - prev_t <= tol:
                if prev_arr is None:
                    prev_arr = prev_f.to_ndarray(format="rgb24")
                frames[i] = prev_arr
            i += 1
        return frames, last_t


class EncodedImageFrames(_LazyFrames):
    """Frames of one ``image`` feature stored as encoded bytes (PNG/JPEG) in parquet, decoded with Pillow on read."""

    def __init__(self, key: str, blobs: list, height: int, width: int, source: str):
        super().__init__(key, len(blobs), height, width)
        self.blobs, self.source = blobs, source

    def _read(self, rows: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = np.empty((len(rows),) + self.shape[1:], np.uint8)
        for j, r in enumerate(rows):
            b = self.blobs[int(r)]
            if b is None:
                raise LeRobotFormatError(f"{self.source}: image {self.key!r} of row {int(r)} has no bytes")
            with Image.open(io.BytesIO(b)) as im:
                a = np.asarray(im.convert("RGB"))
            if a.shape != self.shape[1:]:
                raise LeRobotFormatError(
                    f"{self.source}: image {self.key!r} of row {int(r)} is {a.shape}, expected {self.shape[1:]}"
                )
            out[j] = a
        return out


# ---------------------------------------------------------------------------------------------------------
# the reader
def _column_numpy(col, shape: tuple, where: str) -> np.ndarray:
    """A (possibly nested) list / scalar parquet column as an (n, *shape) numpy array."""
    import pyarrow as pa

    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    n = len(arr)
    if arr.null_count:
        raise LeRobotFormatError(f"{where}: {arr.null_count} null value(s); expected one value per frame")
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
        if arr.null_count:
            raise LeRobotFormatError(f"{where}: null entries inside the per-frame lists")
    flat = arr.to_numpy(zero_copy_only=False)
    want = int(np.prod(shape)) if shape else 1
    if flat.size != n * want:
        raise LeRobotFormatError(
            f"{where}: {flat.size} values for {n} frames, expected {want} per frame (shape {list(shape)} in "
            "meta/info.json)"
        )
    return flat.reshape((n,) + tuple(shape))


class LeRobotSource:
    """A local LeRobot dataset folder read as a replay buffer: ``keys()``, ``src[key]`` ((N, ...) numpy for numeric
    features, an (N, H, W, 3) uint8 array-like decoded on read for video / image features), ``episode_ends``,
    ``fps``, ``features``. Numeric features are read on first access. Raises :class:`LeRobotFormatError` (naming the
    file and key) for missing or inconsistent metadata (module docstring)."""

    backend = "lerobot"

    def __init__(self, root, tolerance_s: float = DEFAULT_TOLERANCE_S):
        self.root = Path(root)
        self.source = str(self.root)
        self.tolerance_s = float(tolerance_s)
        info_path = self.root / "meta" / "info.json"
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such LeRobot dataset folder")
        if not info_path.is_file():
            raise LeRobotFormatError(
                f"{self.root}: no meta/info.json: not a LeRobot dataset folder (expected meta/info.json, "
                "meta/episodes/ or meta/episodes.jsonl, data/)"
            )
        try:
            info = json.loads(info_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LeRobotFormatError(f"{info_path}: not valid JSON ({e})") from None
        self.info, self._info_path = info, info_path
        version = str(info.get("codebase_version", ""))
        if version.startswith("v3"):
            self.version = "v3"
        elif version.startswith("v2"):
            self.version = "v2"
        else:
            raise LeRobotFormatError(
                f"{info_path}: codebase_version {version!r} is not supported (v3.0, v2.1 and v2.0 are read)"
            )
        for k in ("fps", "features"):
            if k not in info:
                raise LeRobotFormatError(f"{info_path}: key {k!r} missing")
        try:
            self.fps = float(info["fps"])
        except (TypeError, ValueError):
            raise LeRobotFormatError(f"{info_path}: fps={info['fps']!r} is not a number") from None
        if not self.fps > 0 or not math.isfinite(self.fps):
            raise LeRobotFormatError(f"{info_path}: fps={info['fps']!r}; expected a positive number")
        if not isinstance(info["features"], dict) or not info["features"]:
            raise LeRobotFormatError(f"{info_path}: 'features' must be a non-empty mapping of feature specs")
        self.features: dict[str, dict] = {}
        for k, spec in info["features"].items():
            if not isinstance(spec, dict) or "dtype" not in spec:
                raise LeRobotFormatError(f"{info_path}: feature {k!r} has no dtype")
            self.features[k] = spec
        self.chunks_size = int(info.get("chunks_size") or 1000)
        default_data = _V3_DATA if self.version == "v3" else _V2_DATA
        default_video = _V3_VIDEO if self.version == "v3" else _V2_VIDEO
        self.data_path = str(info.get("data_path") or default_data)
        self.video_path = str(info.get("video_path") or default_video)
        self.video_keys = [k for k, s in self.features.items() if s["dtype"] == "video"]
        self.image_keys = [k for k, s in self.features.items() if s["dtype"] == "image"]
        self.lowdim_keys = [k for k, s in self.features.items() if k not in META_KEYS and str(s["dtype"]) in _NUMERIC]
        self._episodes = self._read_episode_meta()
        self._read_index()
        self._cache: dict[str, Any] = {}

    # ---------------------------------------------------------------- metadata
    def _read_episode_meta(self) -> dict:
        """{"index": (E,) episode indices, "length": (E,), "files": [meta file per episode], per-episode columns}."""
        meta = self.root / "meta"
        if self.version == "v3":
            files = sorted((meta / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise LeRobotFormatError(
                    f"{meta / 'episodes'}: no episodes metadata (expected chunk-XXX/file-XXX.parquet files)"
                )
            recs: list[dict] = []
            srcs: list[str] = []
            need = ["episode_index", "data/chunk_index", "data/file_index"]
            for f in files:
                columns = _pq().read_schema(f).names  # only the columns used (the per-episode stats can be large)
                missing = [c for c in need if c not in columns]
                if "length" not in columns and not {"dataset_from_index", "dataset_to_index"} <= set(columns):
                    missing.append("length")
                if missing:
                    raise LeRobotFormatError(f"{f}: episodes metadata has no column(s) {missing}")
                keep = [
                    c
                    for c in columns
                    if c in need or c.startswith("videos/") or c in ("length", "dataset_from_index", "dataset_to_index")
                ]
                t = _pq().read_table(f, columns=keep)
                for r in t.to_pylist():
                    if r.get("length") is None and r.get("dataset_to_index") is not None:
                        r["length"] = int(r["dataset_to_index"]) - int(r["dataset_from_index"])
                    recs.append(r)
                srcs.extend([str(f)] * t.num_rows)
            names = {c for r in recs for c in r}
            ep = {c: [r.get(c) for r in recs] for c in names}
        else:
            f = meta / "episodes.jsonl"
            if not f.is_file():
                raise LeRobotFormatError(f"{f}: missing (v2 episodes metadata: one JSON line per episode)")
            idx, length = [], []
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    idx.append(int(d["episode_index"]))
                    length.append(int(d["length"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise LeRobotFormatError(f"{f}: line {n}: expected episode_index and length ({e!r})") from None
            ep = {"episode_index": idx, "length": length}
            srcs = [str(f)] * len(idx)
        for k in ("episode_index", "length"):
            bad = [i for i, v in enumerate(ep[k]) if not isinstance(v, (int, np.integer))]
            if bad:
                raise LeRobotFormatError(f"{srcs[bad[0]]}: row {bad[0]} has {k}={ep[k][bad[0]]!r}; expected an integer")
        index = np.asarray(ep["episode_index"], dtype=np.int64)
        if len(index) == 0:
            raise LeRobotFormatError(f"{srcs[0] if srcs else meta}: no episodes")
        order = np.argsort(index, kind="stable")
        ep = {k: [v[i] for i in order] for k, v in ep.items()}
        srcs = [srcs[i] for i in order]
        index = index[order]
        dup = index[1:][np.diff(index) == 0]
        if len(dup):
            raise LeRobotFormatError(f"{srcs[0]}: episode {int(dup[0])} is listed twice in the episodes metadata")
        expect = np.arange(len(index))
        if not np.array_equal(index, expect):
            bad = int(np.flatnonzero(index != expect)[0])
            lo = int(index[bad - 1]) if bad else -1
            raise LeRobotFormatError(
                f"{srcs[bad]}: episode index gap: after episode {lo} comes episode {int(index[bad])} "
                f"(episode(s) {lo + 1}..{int(index[bad]) - 1} missing); expected episodes 0..{len(index) - 1}"
            )
        ep["index"] = index
        ep["files"] = srcs
        total = self.info.get("total_episodes")
        if total is not None and int(total) != len(index):
            raise LeRobotFormatError(
                f"{self._info_path}: total_episodes={total}, but the episodes metadata lists {len(index)} episode(s)"
            )
        return ep

    def _data_files(self) -> list[Path]:
        """The parquet data files, in the order their rows are concatenated."""
        ep = self._episodes
        if self.version == "v3":
            pairs = sorted({(int(c), int(f)) for c, f in zip(ep["data/chunk_index"], ep["data/file_index"])})
            return [self.root / self.data_path.format(chunk_index=c, file_index=f) for c, f in pairs]
        return [
            self.root / self.data_path.format(episode_chunk=int(e) // self.chunks_size, episode_index=int(e))
            for e in ep["index"]
        ]

    def _read_index(self) -> None:
        """Read episode_index / frame_index / timestamp of every data file, order the rows by (episode, frame),
        check them against the metadata and build ``episode_ends``."""
        self.data_files = self._data_files()
        declared = [k for k in self.features if self.features[k]["dtype"] != "video"]
        ep_parts, fr_parts, ts_parts, file_parts = [], [], [], []
        for i, f in enumerate(self.data_files):
            if not f.is_file():
                raise LeRobotFormatError(f"{f}: data file missing (listed by the episodes metadata)")
            schema = _pq().read_schema(f)
            names = set(schema.names)
            for k in ("episode_index", "frame_index", "timestamp"):
                if k not in names:
                    raise LeRobotFormatError(f"{f}: no column {k!r} (every LeRobot data file has it)")
            missing = [k for k in declared if k not in names]
            if missing:
                raise LeRobotFormatError(
                    f"{f}: feature(s) {missing} declared in meta/info.json have no column in this data file "
                    f"(columns: {sorted(names)})"
                )
            t = _pq().read_table(f, columns=["episode_index", "frame_index", "timestamp"])
            ep_parts.append(_column_numpy(t.column("episode_index"), (), f"{f}: episode_index").astype(np.int64))
            fr_parts.append(_column_numpy(t.column("frame_index"), (), f"{f}: frame_index").astype(np.int64))
            ts_parts.append(_column_numpy(t.column("timestamp"), (), f"{f}: timestamp").astype(np.float64))
            file_parts.append(np.full(t.num_rows, i, np.int32))
        ep_col, fr_col = np.concatenate(ep_parts), np.concatenate(fr_parts)
        ts_col, file_col = np.concatenate(ts_parts), np.concatenate(file_parts)
        self._order = np.lexsort((fr_col, ep_col))
        ep_col, fr_col, ts_col, file_col = (a[self._order] for a in (ep_col, fr_col, ts_col, file_col))
        meta = self._episodes
        n_ep = len(meta["index"])
        unknown = np.setdiff1d(np.unique(ep_col), meta["index"])
        if len(unknown):
            e = int(unknown[0])
            f = self.data_files[int(file_col[np.flatnonzero(ep_col == e)[0]])]
            raise LeRobotFormatError(
                f"{f}: rows of episode {e}, which the episodes metadata ({meta['files'][0]}) lacks"
            )
        counts = np.bincount(ep_col, minlength=n_ep)
        ends = np.cumsum(counts)
        for e in range(n_ep):
            want = int(meta["length"][e])
            where = self.data_files[0] if self.version == "v3" else self.data_files[e]
            if counts[e] == 0:
                raise LeRobotFormatError(
                    f"{where}: episode {e} has no rows (the episodes metadata {meta['files'][e]} lists it with "
                    f"length {want})"
                )
            s = int(ends[e] - counts[e])
            f = self.data_files[int(file_col[s])]
            if counts[e] != want:
                raise LeRobotFormatError(
                    f"{f}: episode {e} has {int(counts[e])} rows, but the episodes metadata "
                    f"({meta['files'][e]}) gives length {want}"
                )
            fi = fr_col[s : int(ends[e])]
            if not np.array_equal(fi, np.arange(len(fi))):
                bad = int(np.flatnonzero(fi != np.arange(len(fi)))[0])
                raise LeRobotFormatError(
                    f"{f}: episode {e}: frame_index is not 0..{len(fi) - 1} (position {bad} holds {int(fi[bad])}; "
                    "a frame is missing or repeated)"
                )
            ts = ts_col[s : int(ends[e])]
            if len(ts) > 1:
                d = np.diff(ts)
                off = np.flatnonzero(np.abs(d - 1.0 / self.fps) > max(self.tolerance_s, 1e-6))
                if len(off):
                    j = int(off[0])
                    raise LeRobotFormatError(
                        f"{f}: episode {e}: timestamp goes from {ts[j]:.6f} to {ts[j + 1]:.6f} s between frames "
                        f"{j} and {j + 1}; expected steps of 1/fps = {1.0 / self.fps:.6f} s (fps={self.fps:g} in "
                        "meta/info.json)"
                    )
        total = self.info.get("total_frames")
        if total is not None and int(total) != int(ends[-1]):
            raise LeRobotFormatError(
                f"{self._info_path}: total_frames={total}, but the data files hold {int(ends[-1])} frame(s)"
            )
        self._episode_ends = ends.astype(np.int64)
        self._episode_of_row = ep_col
        self._timestamps = ts_col
        self._file_of_row = file_col

    # ---------------------------------------------------------------- replay-buffer interface
    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends

    @property
    def n_episodes(self) -> int:
        return int(len(self._episode_ends))

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1])

    @property
    def timestamps(self) -> np.ndarray:
        """(N,) seconds of each frame within its episode (the parquet ``timestamp`` column)."""
        return self._timestamps

    def keys(self) -> list[str]:
        """The data features (numeric, video and image ones; not the index columns)."""
        return [k for k in self.features if k in self.lowdim_keys or k in self.video_keys or k in self.image_keys]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(f"{self.source}: feature {key!r} not in the dataset; features: {self.keys()}")
        if key not in self._cache:
            if key in self.video_keys:
                self._cache[key] = self._video(key)
            elif key in self.image_keys:
                self._cache[key] = self._images(key)
            else:
                self._cache[key] = self._lowdim(key)
        return self._cache[key]

    def get_episode_slice(self, i: int) -> slice:
        """Rows of episode ``i``."""
        return slice(0 if i == 0 else int(self._episode_ends[i - 1]), int(self._episode_ends[i]))

    def _read_column(self, key: str) -> list:
        """The column ``key`` of every data file (pyarrow arrays, file order)."""
        return [_pq().read_table(f, columns=[key]).column(key) for f in self.data_files]

    def _lowdim(self, key: str) -> np.ndarray:
        shape = tuple(int(v) for v in (self.features[key].get("shape") or [1]))
        parts = [
            _column_numpy(c, shape, f"{f}: column {key!r}") for f, c in zip(self.data_files, self._read_column(key))
        ]
        a = np.concatenate(parts)[self._order]
        if a.dtype == np.float64 or a.dtype.kind in "iub":
            a = a.astype(np.float32)
        return np.ascontiguousarray(a)

    def _images(self, key: str) -> EncodedImageFrames:
        blobs: list = []
        for f, col in zip(self.data_files, self._read_column(key)):
            for v in col.to_pylist():
                if isinstance(v, dict):
                    b = v.get("bytes")
                    if b is None and v.get("path"):
                        p = Path(v["path"])
                        p = p if p.is_absolute() else self.root / p
                        if not p.is_file():
                            raise LeRobotFormatError(f"{f}: image {key!r} refers to {p}, which does not exist")
                        b = p.read_bytes()
                    blobs.append(b)
                else:
                    blobs.append(v)
        blobs = [blobs[i] for i in self._order]
        from PIL import Image

        if blobs[0] is None:
            raise LeRobotFormatError(f"{self.data_files[0]}: image {key!r} of the first frame has no bytes")
        with Image.open(io.BytesIO(blobs[0])) as im:
            w, h = im.size
        return EncodedImageFrames(key, blobs, h, w, self.source)

    def _video_file(self, key: str, e: int) -> tuple[Path, float]:
        """(video file, offset in seconds) of episode ``e`` for video feature ``key``."""
        if self.version == "v2":
            path = self.video_path.format(episode_chunk=e // self.chunks_size, video_key=key, episode_index=e)
            return self.root / path, 0.0
        cols = [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
        missing = [c for c in cols if c not in self._episodes or self._episodes[c][e] is None]
        if missing:
            raise LeRobotFormatError(
                f"{self._episodes['files'][e]}: video feature {key!r} (meta/info.json) has no {missing} for episode "
                f"{e} in the episodes metadata"
            )
        c, f, t0 = (self._episodes[k][e] for k in cols)
        path = self.video_path.format(video_key=key, chunk_index=int(c), file_index=int(f))
        return self.root / path, float(t0)

    def _video(self, key: str) -> VideoFrames:
        import av

        paths: list[Path] = []
        ids: dict[Path, int] = {}
        file_id = np.empty(self.n_steps, np.int32)
        times = np.empty(self.n_steps, np.float64)
        for e in range(self.n_episodes):
            p, t0 = self._video_file(key, e)
            if p not in ids:
                if not p.is_file():
                    raise LeRobotFormatError(
                        f"{p}: video file of feature {key!r} (episode {e}) missing; meta/info.json declares "
                        f"{key!r} as a video"
                    )
                ids[p] = len(paths)
                paths.append(p)
            sl = self.get_episode_slice(e)
            file_id[sl] = ids[p]
            times[sl] = t0 + self._timestamps[sl]
        height = width = None
        for i, p in enumerate(paths):  # duration check: a video shorter than its frames' timestamps
            try:
                with av.open(str(p)) as c:
                    if not c.streams.video:
                        raise LeRobotFormatError(f"{p}: no video stream (feature {key!r})")
                    s = c.streams.video[0]
                    if height is None:
                        height, width = int(s.codec_context.height), int(s.codec_context.width)
                    end = None
                    if s.duration is not None and s.time_base is not None:
                        end = float((s.duration + (s.start_time or 0)) * s.time_base)
                    elif c.duration is not None:
                        end = float(c.duration) / 1e6
            except (OSError, av.FFmpegError) as e:
                raise LeRobotFormatError(f"{p}: cannot open the video of {key!r}: {e}") from None
            if end is not None:
                rows = np.flatnonzero(file_id == i)
                last = int(rows[np.argmax(times[rows])])
                # the last frame starts one period before the end of the stream
                if times[last] > end - 1.0 / self.fps + max(self.tolerance_s, 0.5 / self.fps):
                    raise LeRobotFormatError(
                        f"{p}: video of {key!r} lasts {end:.3f} s, shorter than its frames' timestamps: episode "
                        f"{int(self._episode_of_row[last])} needs a frame at {times[last]:.3f} s"
                    )
        declared = [int(v) for v in (self.features[key].get("shape") or [])]
        if declared and not (height in declared and width in declared):
            warnings.warn(
                f"{self._info_path}: feature {key!r} declares shape {declared}, but {paths[0]} is {width}x{height} "
                "(the decoded size is used)",
                stacklevel=2,
            )
        return VideoFrames(
            key, paths, file_id, times, self._episode_of_row, height, width, tolerance_s=self.tolerance_s
        )

    def __repr__(self) -> str:
        return (
            f"LeRobotSource({self.source!r}, version={self.version}, fps={self.fps:g}, episodes={self.n_episodes}, "
            f"frames={self.n_steps}, features={self.keys()})"
        )


# ---------------------------------------------------------------------------------------------------------
# mapping onto a task's observation fields
def lerobot_obs_keys(
    features: Mapping[str, Mapping], obs_fields: Sequence[str], image_fields: Sequence[str], source: str = "dataset"
) -> dict[str, list[str]]:
    """The LeRobot feature(s) feeding each observation field of a task, by LeRobot's naming conventions:

    * an image field ``f`` <- ``observation.images.f`` / ``observation.image.f`` if present, else, when the task
      has one image field and the dataset one camera, that camera (``observation.image`` in Push-T);
    * a low-dim field ``f`` <- ``observation.f`` / ``observation.state.f`` if present, else, when the task has
      one low-dim field, ``observation.state`` (Push-T: the agent position).

    Raises :class:`LeRobotFormatError` naming the unmatched field and the dataset's features (set
    ``task.dataset.lerobot_obs_keys`` to map them explicitly)."""
    cams = [k for k, s in features.items() if s.get("dtype") in ("video", "image")]
    out: dict[str, list[str]] = {}
    lowdim = [f for f in obs_fields if f not in image_fields]
    hint = "set task.dataset.lerobot_obs_keys={field: [feature, ...]} to map them"
    for f in image_fields:
        named = [c for c in (f"observation.images.{f}", f"observation.image.{f}", f"observation.{f}") if c in cams]
        if named:
            out[f] = [named[0]]
        elif len(image_fields) == 1 and len(cams) == 1:
            out[f] = [cams[0]]
        else:
            raise LeRobotFormatError(
                f"{source}: no camera feature for the task's image field {f!r} (cameras: {cams}); {hint}"
            )
    for f in lowdim:
        named = [c for c in (f"observation.{f}", f"observation.state.{f}") if c in features and c not in cams]
        if named:
            out[f] = [named[0]]
        elif len(lowdim) == 1 and "observation.state" in features:
            out[f] = ["observation.state"]
        else:
            have = [k for k in features if k.startswith("observation.") and k not in cams]
            raise LeRobotFormatError(
                f"{source}: no feature for the task's low-dim observation field {f!r} (low-dim observation "
                f"features: {have}); {hint}"
            )
    return out


# ---------------------------------------------------------------------------------------------------------
# conversion
def convert_lerobot_to_zarr(
    root,
    out,
    keys: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    zarr_format: int = 2,
) -> dict:
    """Write the LeRobot folder ``root`` as a Diffusion Policy zarr (``data/<feature>`` arrays, videos decoded to
    uint8 (N, H, W, 3), ``meta/episode_ends``; root attribute ``lerobot`` = fps, version, features, source),
    episode by episode with a progress bar, into a temporary sibling renamed onto ``out`` when complete.
    ``keys``: the features to copy (default all). Returns a summary dict."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=true to replace it")
    src = LeRobotSource(root)
    keys = list(src.keys() if keys is None else keys)
    unknown = [k for k in keys if k not in src]
    if unknown:
        raise LeRobotFormatError(f"{root}: feature(s) {unknown} not in the dataset; features: {src.keys()}")
    arrays = {k: src[k] for k in keys}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=src.n_steps, desc=f"convert {Path(root).name}", unit="frame")
    try:
        with atomic_path(out) as tmp:
            rb = ReplayBuffer.create_empty_zarr(tmp, zarr_format=zarr_format)
            for e in range(src.n_episodes):
                sl = src.get_episode_slice(e)
                rb.add_episode({k: np.asarray(a[sl]) for k, a in arrays.items()})
                if bar is not None:
                    bar.update(sl.stop - sl.start)
            import zarr

            root_group = zarr.open_group(str(tmp), mode="r+", zarr_format=zarr_format)
            root_group.attrs["lerobot"] = {
                "fps": src.fps,
                "codebase_version": src.info.get("codebase_version"),
                "source": str(Path(root).resolve()),
                "features": {k: src.features[k] for k in keys},
            }
    finally:
        if bar is not None:
            bar.close()
        for a in arrays.values():
            if isinstance(a, VideoFrames):
                a.close()
    return {
        "out": str(out),
        "episodes": src.n_episodes,
        "frames": src.n_steps,
        "fps": src.fps,
        "features": keys,
        "codebase_version": src.info.get("codebase_version"),
    }


def converted_lerobot_meta(zarr_path) -> dict | None:
    """The ``lerobot`` root attribute (fps, features, ...) of a zarr written by :func:`convert_lerobot_to_zarr`, or
    None for any other zarr (or a path that is not a readable zarr group)."""
    import zarr

    try:
        meta = zarr.open_group(str(zarr_path), mode="r").attrs.get("lerobot")
    except Exception:  # noqa: BLE001 - not a zarr group: the zarr reader reports it with its own message
        return None
    return dict(meta) if isinstance(meta, Mapping) and "fps" in meta else None


# ---------------------------------------------------------------------------------------------------------
# writing (tests, examples): the layout LeRobot writes
def write_video(path, frames: np.ndarray, fps: float, codec: str = "libx264", gop: int = 2, crf: int = 0) -> Path:
    """Encode (T, H, W, 3) uint8 ``frames`` as an mp4 at ``fps`` (frame i at i/fps s) with PyAV; ``gop`` keyframe
    interval (LeRobot encodes with a short one for random access)."""
    from fractions import Fraction

    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, dtype=np.uint8)
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = int(frames.shape[2]), int(frames.shape[1])
        s.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        s.codec_context.gop_size = int(gop)
        s.codec_context.time_base = 1 / rate
        if codec == "libx264":  # crf 0, 4:4:4: near-lossless, for tests that compare frames
            s.options = {"crf": str(crf), "bf": "0"}
        elif codec == "libsvtav1":  # LeRobot's encoder (AV1, yuv420p)
            s.options = {"crf": "30", "preset": "11"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            vf.time_base = 1 / rate
            for pkt in s.encode(vf):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def _png(frame: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 frame."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_lerobot_dataset(
    root,
    episodes: Sequence[Mapping[str, np.ndarray]],
    fps: float = 10.0,
    video_keys: Sequence[str] = (),
    version: str = "v3.0",
    episodes_per_file: int | None = None,
    image_keys: Sequence[str] = (),
    codec: str = "libx264",
    task: str = "do the task",
) -> Path:
    """Write ``episodes`` (each {feature: (T, ...) array}; video and image features (T, H, W, 3) uint8; image
    features are stored as PNG bytes in the parquet files, ``{"bytes", "path"}`` as LeRobot does) as a LeRobot folder:
    v3.0 (``episodes_per_file`` episodes per data / video file, default all in one) or v2.1 (one file per episode).
    Index columns (timestamp = frame/fps, frame_index, episode_index, index, task_index) are added. For tests and
    examples: the layout LeRobot writes, not its statistics (no meta/stats.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    if version not in ("v3.0", "v2.1"):
        raise ValueError(f"version={version!r}: expected v3.0 or v2.1")
    n_ep = len(episodes)
    per_file = int(episodes_per_file or n_ep)
    features: dict[str, dict] = {}
    for k, v in episodes[0].items():
        v = np.asarray(v)
        if k in video_keys:
            features[k] = {
                "dtype": "video",
                "shape": list(v.shape[1:]),
                "names": ["height", "width", "channel"],
                "info": {"video.fps": fps, "video.codec": codec, "video.pix_fmt": "yuv420p", "has_audio": False},
            }
        elif k in image_keys:
            features[k] = {"dtype": "image", "shape": list(v.shape[1:]), "names": ["height", "width", "channel"]}
        else:
            shape = list(v.shape[1:]) or [1]
            features[k] = {"dtype": str(v.dtype), "shape": shape, "names": None}
    for k, dt in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64")):
        features[k] = {"dtype": dt, "shape": [1], "names": None}
    features["index"] = {"dtype": "int64", "shape": [1], "names": None}
    features["task_index"] = {"dtype": "int64", "shape": [1], "names": None}

    def table(ep_ids, start_index):
        cols: dict[str, Any] = {}
        for k in episodes[0]:
            if k in video_keys:
                continue
            if k in image_keys:
                cols[k] = pa.array([{"bytes": _png(f), "path": None} for e in ep_ids for f in episodes[e][k]])
                continue
            vals = np.concatenate([np.asarray(episodes[e][k]) for e in ep_ids])
            if vals.ndim == 1:
                cols[k] = pa.array(vals)
            else:
                flat = vals.reshape(len(vals), -1)
                cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        lengths = [len(next(iter(episodes[e].values()))) for e in ep_ids]
        cols["timestamp"] = pa.array(np.concatenate([np.arange(n) / fps for n in lengths]).astype(np.float32))
        cols["frame_index"] = pa.array(np.concatenate([np.arange(n) for n in lengths]).astype(np.int64))
        cols["episode_index"] = pa.array(np.concatenate([np.full(n, e) for e, n in zip(ep_ids, lengths)]))
        cols["index"] = pa.array(np.arange(start_index, start_index + sum(lengths), dtype=np.int64))
        cols["task_index"] = pa.array(np.zeros(sum(lengths), np.int64))
        return pa.table(cols)

    lengths = [len(next(iter(ep.values()))) for ep in episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    rows = []
    if version == "v3.0":
        data_t, video_t = _V3_DATA, _V3_VIDEO
        for fi, s in enumerate(range(0, n_ep, per_file)):
            ids = list(range(s, min(s + per_file, n_ep)))
            path = root / data_t.format(chunk_index=0, file_index=fi)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table(ids, int(starts[ids[0]])), path)
            offset = 0.0
            for k in video_keys:
                write_video(
                    root / video_t.format(video_key=k, chunk_index=0, file_index=fi),
                    np.concatenate([episodes[e][k] for e in ids]),
                    fps,
                    codec=codec,
                )
            for e in ids:
                row = {
                    "episode_index": e,
                    "tasks": [task],
                    "length": lengths[e],
                    "data/chunk_index": 0,
                    "data/file_index": fi,
                    "dataset_from_index": int(starts[e]),
                    "dataset_to_index": int(starts[e + 1]),
                }
                for k in video_keys:
                    row[f"videos/{k}/chunk_index"] = 0
                    row[f"videos/{k}/file_index"] = fi
                    row[f"videos/{k}/from_timestamp"] = offset
                    row[f"videos/{k}/to_timestamp"] = offset + lengths[e] / fps
                offset += lengths[e] / fps
                rows.append(row)
        mpath = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        mpath.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), mpath)
        pq.write_table(pa.table({"task_index": [0], "task": [task]}), root / "meta" / "tasks.parquet")
    else:
        data_t, video_t = _V2_DATA, _V2_VIDEO
        for e in range(n_ep):
            path = root / data_t.format(episode_chunk=0, episode_index=e)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table([e], int(starts[e])), path)
            for k in video_keys:
                write_video(root / video_t.format(episode_chunk=0, video_key=k, episode_index=e), episodes[e][k], fps)
            rows.append({"episode_index": e, "tasks": [task], "length": lengths[e]})
        (root / "meta").mkdir(parents=True, exist_ok=True)
        (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": task}) + "\n")
    info = {
        "codebase_version": version,
        "robot_type": None,
        "total_episodes": n_ep,
        "total_frames": int(starts[-1]),
        "total_tasks": 1,
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{n_ep}"},
        "data_path": data_t,
        "video_path": video_t if video_keys else None,
        "features": features,
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return root
