"""Episode storage in Diffusion Policy's zarr layout, ported to zarr 3 (reads and writes zarr format 2 and 3).

Layout (unchanged from Diffusion Policy, so ``pusht_cchi_v7_replay.zarr`` loads as is)::

    <root>/data/<key>          every array shares dim 0 = total number of steps
    <root>/meta/episode_ends   int, strictly increasing, exclusive end index of each episode

Two backends behind one API:

* numpy (``create_empty_numpy``, ``copy_from_path``, ``from_arrays``): everything in memory; ``rb[key]``
  is a numpy view. Appending grows a capacity buffer geometrically (amortised O(1) per step).
* zarr (``create_empty_zarr``, ``open``): arrays stay on disk; ``rb[key]`` is a ``zarr.Array`` (slicing it
  returns numpy). ``add_episode`` resizes the data arrays first and appends ``episode_ends`` last, so an
  interrupted append leaves data longer than ``episode_ends[-1]`` (reported clearly on the next open).

zarr 3 notes: the zarr-2 API (``DirectoryStore``, ``MemoryStore``, ``compressor=`` on v3, ``copy_store``) is
gone; format-2 arrays take a numcodecs codec through ``compressors=``, format-3 arrays a ``zarr.codecs`` codec.
zarr 3 resets its IO thread after ``fork`` (``zarr.core.sync.reset_resources_after_fork``), so on-disk buffers
work in forked DataLoader workers.

Legacy nested stores: zarr < 2.8 could write format-2 chunk keys nested (``data/img/0/0/0/0`` directories) without
recording ``dimension_separator`` in ``.zarray``. zarr 3 then assumes the '.' separator, finds no chunk and silently
returns the fill value (all zeros). Every array opened here is checked (:func:`open_array_checked`): a format-2
array whose ``.zarray`` has no ``dimension_separator`` and whose chunk keys are '/'-nested is opened with the '/'
separator (and, when appended to in ``mode='r+'``, its ``.zarray`` is rewritten with ``"dimension_separator": "/"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from shortcut_policy.utils import atomic_path

__all__ = ["ReplayBuffer", "ReplayBufferError", "get_optimal_chunks", "open_array_checked", "resolve_compressor"]

_CHUNK_TARGET_BYTES = 2 * 1024 * 1024  # ~2 MB chunks, like Diffusion Policy


class ReplayBufferError(ValueError):
    """A replay buffer file or episode does not have the expected layout."""


# --------------------------------------------------------------------------------------------------------
# compressors and chunks


def resolve_compressor(spec: Any, zarr_format: int):
    """Map a compressor spec to a codec for ``create_array(compressors=...)``.

    ``"disk"``: Blosc zstd level 5 bit-shuffle (Diffusion Policy's ``compressors='disk'``);
    ``"default"``: Blosc lz4 level 5 no shuffle; ``None``/``"none"``: uncompressed;
    anything else is passed through (a numcodecs codec for format 2, a ``zarr.codecs`` codec for format 3).
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str):
        presets = {"disk": ("zstd", "bitshuffle"), "default": ("lz4", "noshuffle")}
        if spec not in presets:
            raise ValueError(f"compressors={spec!r}: expected 'disk', 'default', None or a codec object")
        cname, shuffle = presets[spec]
        if zarr_format == 2:
            shuf = {"bitshuffle": numcodecs.Blosc.BITSHUFFLE, "noshuffle": numcodecs.Blosc.NOSHUFFLE}[shuffle]
            return numcodecs.Blosc(cname=cname, clevel=5, shuffle=shuf)
        return BloscCodec(cname=cname, clevel=5, shuffle=shuffle)
    return spec


def get_optimal_chunks(shape: tuple[int, ...], dtype, target_bytes: int = _CHUNK_TARGET_BYTES) -> tuple[int, ...]:
    """Chunk along time only: as many whole rows as fit in ``target_bytes`` (at least one)."""
    row_bytes = int(np.dtype(dtype).itemsize * math.prod(shape[1:]))
    rows = max(1, target_bytes // max(row_bytes, 1))
    return (int(rows),) + tuple(int(s) for s in shape[1:])


# --------------------------------------------------------------------------------------------------------
# helpers


def _check_key(key: str, where: str) -> None:
    """Raise :class:`ReplayBufferError` (naming ``where``) unless ``key`` is a non-empty name without "/" or a
    leading "."."""
    if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
        raise ReplayBufferError(f"{where}: invalid data key {key!r} (a non-empty name without '/' or leading '.')")


def _validate_layout(source: str, lengths: Mapping[str, int], episode_ends: np.ndarray) -> None:
    """Check episode_ends against the data arrays; raise ReplayBufferError naming the file and key."""
    if episode_ends.ndim != 1:
        raise ReplayBufferError(f"{source}: meta/episode_ends must be 1-D, got shape {episode_ends.shape}")
    if episode_ends.dtype.kind not in "iu":
        raise ReplayBufferError(f"{source}: meta/episode_ends must have an integer dtype, got {episode_ends.dtype}")
    if len(episode_ends) > 0:
        steps = np.diff(episode_ends, prepend=0)
        bad = np.flatnonzero(steps <= 0)
        if len(bad):
            i = int(bad[0])
            prev = 0 if i == 0 else int(episode_ends[i - 1])
            what = (
                f"episode {i} would have 0 steps (empty episodes cannot be stored in this layout)"
                if steps[i] == 0
                else f"episode {i} would have {int(steps[i])} steps"
            )
            raise ReplayBufferError(
                f"{source}: meta/episode_ends must be strictly increasing and start above 0, but "
                f"episode_ends[{i}]={int(episode_ends[i])} follows {prev}: {what}"
            )
    n_steps = int(episode_ends[-1]) if len(episode_ends) else 0
    distinct = sorted(set(lengths.values()))
    if len(distinct) > 1:
        desc = ", ".join(f"data/{k}: {n}" for k, n in lengths.items())
        raise ReplayBufferError(f"{source}: data arrays have different lengths along dim 0 ({desc})")
    for key, n in lengths.items():
        if n_steps > n:
            raise ReplayBufferError(
                f"{source}: meta/episode_ends[-1]={n_steps} is past the length of data/{key} ({n} rows)"
            )
        if n_steps < n:
            raise ReplayBufferError(
                f"{source}: data/{key} has {n} rows but meta/episode_ends[-1]={n_steps} "
                f"(trailing rows belong to no episode; an interrupted add_episode?)"
            )


def _open_zarr_group(path: str | os.PathLike, mode: str):
    """Open a zarr group directory (or a read-only ``.zip`` store) at ``path``. Raises ``FileNotFoundError`` when
    it is missing and :class:`ReplayBufferError` when it is not a readable group (or a zip is opened for writing)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"replay buffer {str(p)!r} does not exist")
    if p.is_file() and p.suffix == ".zip":
        if mode != "r":
            raise ReplayBufferError(f"{p}: zip stores can only be opened read-only (mode='r'), got mode={mode!r}")
        store = zarr.storage.ZipStore(str(p), mode="r")
        return zarr.open_group(store, mode="r")
    try:
        return zarr.open_group(str(p), mode=mode)
    except Exception as e:  # zarr raises several types for "not a group"
        raise ReplayBufferError(f"{p}: not a readable zarr group ({type(e).__name__}: {e})") from e


_FLAT_CHUNK_KEY = re.compile(r"^\d+(\.\d+)+$")  # '0.0.0' (ndim >= 2, '.' separator)


async def _list_children(store, prefix: str) -> list[str]:
    """Names directly under ``prefix`` in a zarr store (async: run through ``zarr``'s ``sync``)."""
    return [k async for k in store.list_dir(prefix)]


def _raw_v2_metadata(store, prefix: str) -> dict | None:
    """The ``.zarray`` JSON of a format-2 array exactly as stored (zarr fills in defaults when it parses it)."""
    key = f"{prefix}/.zarray" if prefix else ".zarray"
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())
    except ValueError:
        return None


def open_array_checked(arr, source: str, name: str):
    """Return ``arr`` (a ``zarr.Array``) reading the chunks that are really in the store.

    A zarr-format-2 array with ndim >= 2 whose ``.zarray`` has no ``dimension_separator`` field (written by
    zarr < 2.8) is listed: if its chunk keys are '/'-nested (sub-directories named by a chunk index, e.g.
    ``0/0``) it is reopened with ``dimension_separator='/'``; otherwise ``arr`` is returned unchanged (zarr's
    '.' default is right). Format-3 arrays, 1-D arrays (whose chunk keys are the same under both separators)
    and arrays that record their separator are returned unchanged.

    ``source`` (the file) and ``name`` (e.g. ``"data/img"``) are used in error messages only.

    Raises ReplayBufferError when the array holds both nested and flat chunk keys (e.g. a nested store that
    was later appended to by a zarr that assumed '.': the two halves cannot be read as one array).
    """
    md = arr.metadata
    if getattr(md, "zarr_format", None) != 2 or len(arr.shape) < 2 or md.dimension_separator != ".":
        return arr
    store_path = arr.async_array.store_path
    store, prefix = store_path.store, store_path.path
    raw = _raw_v2_metadata(store, prefix)
    if raw is None or "dimension_separator" in raw:
        return arr
    children = sync(_list_children(store, prefix))
    nested = sorted(c for c in children if c.isdigit())
    flat = [c for c in children if _FLAT_CHUNK_KEY.match(c)]
    if not nested:
        return arr
    if flat:
        raise ReplayBufferError(
            f"{source}: {name} has both nested ('/', e.g. {nested[0]}/...) and flat ('.', e.g. {flat[0]}) chunk keys "
            "and its .zarray records no dimension_separator; expected one layout (was a zarr < 2.8 store appended "
            "to by a newer zarr?). Rewrite the array with one separator."
        )
    fixed = dataclasses.replace(md, dimension_separator="/")
    return zarr.Array(zarr.AsyncArray(metadata=fixed, store_path=store_path, config=arr.async_array.config))


def _read_group_layout(root, source: str):
    """Return (data_group, episode_ends_array) after checking that both exist."""
    if "data" not in root or not isinstance(root["data"], zarr.Group):
        raise ReplayBufferError(
            f"{source}: missing group 'data/' (expected Diffusion Policy layout data/<key> + meta/episode_ends; "
            f"found {sorted(root.keys())})"
        )
    if "meta" not in root or not isinstance(root["meta"], zarr.Group) or "episode_ends" not in root["meta"]:
        raise ReplayBufferError(f"{source}: missing array 'meta/episode_ends'")
    ends = root["meta"]["episode_ends"]
    if not isinstance(ends, zarr.Array):
        raise ReplayBufferError(f"{source}: 'meta/episode_ends' is a group, expected an array")
    return root["data"], open_array_checked(ends, source, "meta/episode_ends")


def _select_keys(available: Iterable[str], keys, source: str) -> list[str]:
    """The data keys to read: all of ``available`` (sorted) when ``keys`` is None, else ``keys`` (a name or a list)
    in the given order. Raises ``KeyError`` naming ``source`` for a missing key."""
    available = list(available)
    if keys is None:
        return sorted(available)
    if isinstance(keys, str):
        keys = [keys]
    missing = [k for k in keys if k not in available]
    if missing:
        raise KeyError(f"{source}: data key(s) {missing} not found; available: {sorted(available)}")
    return list(keys)


# --------------------------------------------------------------------------------------------------------


class ReplayBuffer:
    """Episodes of aligned arrays, Diffusion Policy layout. Build it with one of the classmethods."""

    def __init__(self, *, _backend: str, _data: dict, _episode_ends: np.ndarray, _root=None, _source: str = "<memory>"):
        self._backend = _backend
        self._data = _data  # numpy: capacity buffers; zarr: zarr arrays
        self._episode_ends = np.asarray(_episode_ends, dtype=np.int64)
        self._root = _root
        self._source = _source

    # ---------------------------------------------------------------- construction
    @classmethod
    def create_empty_numpy(cls) -> "ReplayBuffer":
        """An empty in-memory buffer (episodes are appended with :meth:`add_episode`)."""
        return cls(_backend="numpy", _data={}, _episode_ends=np.zeros((0,), np.int64))

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray], episode_ends, source: str = "<arrays>") -> "ReplayBuffer":
        """In-memory buffer over existing arrays (no copy when they are already numpy)."""
        arrays = {}
        for k, v in data.items():
            _check_key(k, source)
            arrays[k] = np.asarray(v)
            if arrays[k].ndim == 0:
                raise ReplayBufferError(f"{source}: data/{k} is a scalar; expected an array with a time dim")
        ends = np.asarray(episode_ends)
        _validate_layout(source, {k: v.shape[0] for k, v in arrays.items()}, ends)
        return cls(_backend="numpy", _data=arrays, _episode_ends=ends.astype(np.int64), _source=source)

    @classmethod
    def create_empty_zarr(
        cls, path: str | os.PathLike, zarr_format: int = 2, overwrite: bool = False
    ) -> "ReplayBuffer":
        """Create an empty on-disk buffer at ``path`` (refuses an existing path unless ``overwrite=True``)."""
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format={zarr_format!r}: expected 2 or 3")
        p = Path(path)
        if p.exists():
            if not overwrite:
                raise FileExistsError(f"{p} already exists; pass overwrite=True to replace it")
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        root = zarr.open_group(str(p), mode="w", zarr_format=zarr_format)
        root.require_group("data")
        meta = root.require_group("meta")
        meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(4096,), compressors=None)
        return cls(_backend="zarr", _data={}, _episode_ends=np.zeros((0,), np.int64), _root=root, _source=str(p))

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "ReplayBuffer":
        """Open an existing zarr buffer on disk (``mode='r'`` read-only, ``'r+'`` to append episodes)."""
        if mode not in ("r", "r+", "a"):
            raise ValueError(f"mode={mode!r}: expected 'r', 'r+' or 'a' (use create_empty_zarr to create)")
        source = str(path)
        root = _open_zarr_group(path, mode)
        data_group, ends_arr = _read_group_layout(root, source)
        ends = np.asarray(ends_arr[:])
        data = {k: open_array_checked(data_group[k], source, f"data/{k}") for k in sorted(data_group.array_keys())}
        _validate_layout(source, {k: a.shape[0] for k, a in data.items()}, ends)
        return cls(_backend="zarr", _data=data, _episode_ends=ends, _root=root, _source=source)

    @classmethod
    def copy_from_path(cls, path: str | os.PathLike, keys: Iterable[str] | None = None) -> "ReplayBuffer":
        """Load a zarr buffer (format 2 or 3, directory or .zip) fully into memory (numpy backend)."""
        source = str(path)
        root = _open_zarr_group(path, "r")
        data_group, ends_arr = _read_group_layout(root, source)
        ends = np.asarray(ends_arr[:])
        selected = _select_keys(data_group.array_keys(), keys, source)
        arrays = {k: open_array_checked(data_group[k], source, f"data/{k}") for k in selected}
        lengths = {k: a.shape[0] for k, a in arrays.items()}
        _validate_layout(source, lengths, ends)  # before reading (possibly GBs of) data
        data = {k: np.asarray(a[:]) for k, a in arrays.items()}
        return cls(_backend="numpy", _data=data, _episode_ends=ends.astype(np.int64), _source=source)

    # ---------------------------------------------------------------- properties
    @property
    def backend(self) -> str:
        return self._backend

    @property
    def source(self) -> str:
        return self._source

    @property
    def episode_ends(self) -> np.ndarray:
        v = self._episode_ends.view()
        v.flags.writeable = False
        return v

    @property
    def n_episodes(self) -> int:
        return int(len(self._episode_ends))

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if len(self._episode_ends) else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._episode_ends, prepend=0)

    @property
    def zarr_format(self) -> int | None:
        return None if self._root is None else int(self._root.metadata.zarr_format)

    def keys(self) -> list[str]:
        """Names of the data arrays (``data/<key>``)."""
        return list(self._data.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __getitem__(self, key: str):
        if key not in self._data:
            raise KeyError(f"{self._source}: data key {key!r} not found; available: {sorted(self._data)}")
        arr = self._data[key]
        if self._backend == "numpy":
            return arr[: self.n_steps]
        return arr

    @property
    def data(self) -> dict:
        return {k: self[k] for k in self._data}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(self[k].shape)} {self[k].dtype}" for k in self._data)
        return (
            f"ReplayBuffer(backend={self._backend}, source={self._source!r}, n_episodes={self.n_episodes}, "
            f"n_steps={self.n_steps}, data={{{shapes}}})"
        )

    # ---------------------------------------------------------------- episodes
    def _episode_index(self, i: int) -> int:
        """Episode index ``i`` (negative: from the end) as a non-negative int; ``IndexError`` when out of range."""
        n = self.n_episodes
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"{self._source}: episode {i} out of range (n_episodes={n})")
        return j

    def get_episode_slice(self, i: int) -> slice:
        """The step range ``slice(start, end)`` of episode ``i`` (negative: from the end) in the flat data arrays."""
        j = self._episode_index(i)
        start = 0 if j == 0 else int(self._episode_ends[j - 1])
        return slice(start, int(self._episode_ends[j]))

    def get_episode(self, i: int, keys: Iterable[str] | None = None, copy: bool = False) -> dict[str, np.ndarray]:
        """Episode ``i`` as {key: (T_i, ...) array} for ``keys`` (default all); ``copy=True`` returns independent
        arrays instead of views of the in-memory buffer. Raises ``IndexError`` / ``KeyError``."""
        sl = self.get_episode_slice(i)
        out = {}
        for k in _select_keys(self._data.keys(), keys, self._source) if keys is not None else self.keys():
            a = self[k][sl]
            out[k] = np.array(a) if copy else np.asarray(a)
        return out

    def add_episode(
        self,
        data: Mapping[str, np.ndarray],
        chunks: Mapping[str, tuple[int, ...]] | None = None,
        compressors: Any = "disk",
    ) -> None:
        """Append one episode. Every array needs the same length >= 1 along dim 0; after the first
        episode the set of keys and the per-step shapes are fixed. ``compressors`` (zarr backend only):
        'disk' | 'default' | None | codec | {key: any of these}."""
        where = f"{self._source}: add_episode"
        if not data:
            raise ReplayBufferError(f"{where}: empty episode dict")
        arrays = {}
        for k, v in data.items():
            _check_key(k, where)
            a = np.asarray(v)
            if a.ndim == 0:
                raise ReplayBufferError(f"{where}: {k!r} is a scalar; expected an array with a time dim")
            arrays[k] = a
        lengths = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ReplayBufferError(f"{where}: arrays have different lengths {lengths}")
        n_new = next(iter(lengths.values()))
        if n_new < 1:
            raise ReplayBufferError(f"{where}: episode has length 0")
        if self._data:
            if set(arrays) != set(self._data):
                raise ReplayBufferError(
                    f"{where}: episode keys {sorted(arrays)} differ from the buffer's keys {sorted(self._data)}"
                )
            for k, a in arrays.items():
                have = tuple(self._data[k].shape[1:])
                if tuple(a.shape[1:]) != have:
                    raise ReplayBufferError(f"{where}: {k!r} has per-step shape {a.shape[1:]}, buffer has {have}")
        old = self.n_steps
        new = old + n_new
        if self._backend == "numpy":
            for k, a in arrays.items():
                buf = self._data.get(k)
                if buf is None:
                    buf = np.empty((max(n_new, 16),) + a.shape[1:], dtype=a.dtype)
                elif buf.shape[0] < new:
                    grown = np.empty((max(new, int(buf.shape[0] * 1.5) + 16),) + buf.shape[1:], dtype=buf.dtype)
                    grown[:old] = buf[:old]
                    buf = grown
                buf[old:new] = a
                self._data[k] = buf
        else:
            if self._root is None or self._root.read_only:
                raise ReplayBufferError(
                    f"{where}: buffer was opened read-only (use ReplayBuffer.open(path, mode='r+'))"
                )
            fmt = self.zarr_format
            data_group = self._root["data"]
            for k, a in arrays.items():
                arr = self._data.get(k)
                if arr is None:
                    comp = compressors.get(k, "disk") if isinstance(compressors, Mapping) else compressors
                    ch = (chunks or {}).get(k) or get_optimal_chunks(a.shape, a.dtype)
                    arr = data_group.create_array(
                        k,
                        shape=(0,) + a.shape[1:],
                        chunks=tuple(ch),
                        dtype=a.dtype,
                        compressors=resolve_compressor(comp, fmt),
                    )
                    self._data[k] = arr
                arr.resize((new,) + tuple(arr.shape[1:]))
                arr[old:new] = a
            ends_arr = self._root["meta"]["episode_ends"]
            ends_arr.resize((self.n_episodes + 1,))
            ends_arr[self.n_episodes] = new
        self._episode_ends = np.append(self._episode_ends, np.int64(new))

    # ---------------------------------------------------------------- saving
    def save_to_path(
        self,
        path: str | os.PathLike,
        zarr_format: int = 2,
        compressors: Any = "disk",
        chunks: Mapping[str, tuple[int, ...]] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the whole buffer as a zarr directory store. Written to a temporary sibling directory and
        renamed into place; an existing ``path`` is replaced only with ``overwrite=True``."""
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format={zarr_format!r}: expected 2 or 3")
        p = Path(path)
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} already exists; pass overwrite=True to replace it")
        if self._root is not None and Path(self._source).resolve() == p.resolve():
            raise ReplayBufferError(f"{p}: cannot save an on-disk buffer onto its own path")
        with atomic_path(p) as tmp:  # an existing store at `p` is replaced only once the new one is complete
            root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
            data_group = root.require_group("data")
            n = self.n_steps
            for k in self.keys():
                src = self[k]
                comp = compressors.get(k, "disk") if isinstance(compressors, Mapping) else compressors
                ch = tuple((chunks or {}).get(k) or get_optimal_chunks(src.shape, src.dtype))
                dst = data_group.create_array(
                    k,
                    shape=tuple(src.shape),
                    chunks=ch,
                    dtype=src.dtype,
                    compressors=resolve_compressor(comp, zarr_format),
                )
                block = max(ch[0], 1) * max(1, 64 // max(ch[0], 1))  # whole chunks, bounded memory
                for s in range(0, n, block):
                    dst[s : min(s + block, n)] = np.asarray(src[s : min(s + block, n)])
            meta = root.require_group("meta")
            meta.create_array(
                "episode_ends",
                shape=(self.n_episodes,),
                dtype="int64",
                chunks=(max(self.n_episodes, 1),),
                compressors=None,
            )
            if self.n_episodes:
                meta["episode_ends"][:] = self._episode_ends
        return p
