"""Robomimic hdf5 <-> zarr ReplayBuffer, and the rotation conversions of Diffusion Policy's absolute actions.

robomimic's own file utilities are not used: robomimic 0.3.0 (the newest on the registry) imports torchvision
(only a CUDA build is reachable here) and ``mujoco_py``. Its hdf5 layout is simple and read/written with h5py:

    data/                          attrs: env_args (JSON env_meta), total (number of samples)
    data/demo_<i>/                 attrs: num_samples, model_file (MJCF xml)
        actions (N, A)  states (N, S)  rewards (N,)  dones (N,)
        obs/<key> (N, ...)  next_obs/<key> (N, ...)     images uint8 (N, H, W, 3), low-dim float
    mask/<filter>                  (optional) array of demo names, e.g. mask/train, mask/valid

Absolute actions (Diffusion Policy's ``*_abs.hdf5``) are stored as 2 x [pos 3, axis-angle 3, gripper 1] = 14
and converted to 2 x [pos 3, rot6d 6, gripper 1] = 20 for training. rot6d is pytorch3d's convention: the first
two *rows* of the rotation matrix, flattened; the inverse uses Gram-Schmidt.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np
from scipy.spatial.transform import Rotation

from shortcut_policy.datasets.replay_buffer import ReplayBuffer
from shortcut_policy.datasets.sanity import DataSanityWarning
from shortcut_policy.utils import AtomicPath

__all__ = [
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_rot6d",
    "rot6d_to_matrix",
    "axis_angle_to_rot6d",
    "rot6d_to_axis_angle",
    "abs_action_to_rot6d",
    "abs_action_from_rot6d",
    "read_env_meta",
    "list_demos",
    "read_demo",
    "RobomimicHdf5Writer",
    "robomimic_to_replay_buffer",
    "RobomimicFormatError",
]


class RobomimicFormatError(KeyError):
    """A robomimic hdf5 lacks something or has the wrong shape; the message names the file and key."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------- rotations
def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors -> (..., 3, 3) matrices (Rodrigues)."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    small = theta < 1e-8
    k = aa / np.where(small, 1.0, theta)
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    zero = np.zeros_like(kx)
    K = np.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], axis=-1).reshape(aa.shape[:-1] + (3, 3))
    th = theta[..., None]
    eye = np.broadcast_to(np.eye(3), K.shape)
    R = eye + np.sin(th) * K + (1.0 - np.cos(th)) * (K @ K)
    # first-order for tiny angles: I + [aa]x
    ax, ay, az = aa[..., 0], aa[..., 1], aa[..., 2]
    R_small = eye + np.stack([zero, -az, ay, az, zero, -ax, -ay, ax, zero], -1).reshape(K.shape)
    return np.where(small[..., None], R_small, R)


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 3) rotation vectors with angle in [0, pi] (via scipy, robust near pi)."""
    R = np.asarray(R, dtype=np.float64)
    flat = R.reshape(-1, 3, 3)
    out = Rotation.from_matrix(flat).as_rotvec()
    return out.reshape(R.shape[:-2] + (3,))


def matrix_to_rot6d(R: np.ndarray) -> np.ndarray:
    """pytorch3d ``matrix_to_rotation_6d``: rows 0 and 1 of the matrix, flattened -> (..., 6)."""
    R = np.asarray(R, dtype=np.float64)
    return R[..., :2, :].reshape(R.shape[:-2] + (6,)).copy()


def rot6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """pytorch3d ``rotation_6d_to_matrix`` (Gram-Schmidt): rows b1, b2, b3 = b1 x b2."""
    d6 = np.asarray(d6, dtype=np.float64)
    if d6.shape[-1] != 6:
        raise ValueError(f"rot6d_to_matrix: last dim is {d6.shape[-1]}, expected 6")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / np.maximum(np.linalg.norm(a1, axis=-1, keepdims=True), 1e-12)
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = b2 / np.maximum(np.linalg.norm(b2, axis=-1, keepdims=True), 1e-12)
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=-2)


def axis_angle_to_rot6d(aa: np.ndarray) -> np.ndarray:
    """Axis-angle rotations (..., 3) in radians -> the 6-D rotation representation (..., 6) (Zhou et al. 2019:
    the first two rows of the rotation matrix)."""
    return matrix_to_rot6d(axis_angle_to_matrix(aa))


def rot6d_to_axis_angle(d6: np.ndarray) -> np.ndarray:
    """6-D rotations (..., 6) -> axis-angle (..., 3) in radians (Gram-Schmidt back to a rotation matrix first)."""
    return matrix_to_axis_angle(rot6d_to_matrix(d6))


def abs_action_to_rot6d(actions: np.ndarray, source: str = "actions") -> np.ndarray:
    """(N, 7k) [pos, axis-angle, gripper] per arm -> (N, 10k) [pos, rot6d, gripper] per arm."""
    a = np.asarray(actions, dtype=np.float64)
    if a.shape[-1] % 7 != 0:
        raise ValueError(f"{source}: absolute action dim {a.shape[-1]} is not a multiple of 7 (pos3, rot3, grip1)")
    a = a.reshape(a.shape[:-1] + (a.shape[-1] // 7, 7))
    out = np.concatenate([a[..., :3], axis_angle_to_rot6d(a[..., 3:6]), a[..., 6:7]], axis=-1)
    return out.reshape(out.shape[:-2] + (-1,))


def abs_action_from_rot6d(actions: np.ndarray, source: str = "actions") -> np.ndarray:
    """(N, 10k) [pos, rot6d, gripper] per arm -> (N, 7k) [pos, axis-angle, gripper] per arm."""
    a = np.asarray(actions, dtype=np.float64)
    if a.shape[-1] % 10 != 0:
        raise ValueError(f"{source}: rot6d action dim {a.shape[-1]} is not a multiple of 10 (pos3, rot6d, grip1)")
    a = a.reshape(a.shape[:-1] + (a.shape[-1] // 10, 10))
    out = np.concatenate([a[..., :3], rot6d_to_axis_angle(a[..., 3:9]), a[..., 9:10]], axis=-1)
    return out.reshape(out.shape[:-2] + (-1,))


# ---------------------------------------------------------------------------------------------- reading
_DEMO_RE = re.compile(r"^demo_(\d+)$")


def _open(path):
    """Open a robomimic hdf5 read-only; ``FileNotFoundError`` when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"robomimic hdf5 {p} does not exist")
    return h5py.File(str(p), "r")


def read_env_meta(path) -> dict:
    """``data.attrs["env_args"]`` of a robomimic hdf5, parsed."""
    with _open(path) as f:
        if "data" not in f:
            raise RobomimicFormatError(f"{path}: no group 'data' (not a robomimic hdf5; top-level keys: {list(f)})")
        if "env_args" not in f["data"].attrs:
            raise RobomimicFormatError(
                f"{path}: data.attrs has no 'env_args' (the env_meta JSON); attrs present: {sorted(f['data'].attrs)}"
            )
        raw = f["data"].attrs["env_args"]
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RobomimicFormatError(f"{path}: data.attrs['env_args'] is not valid JSON ({e})") from None


def list_demos(f, path="<hdf5>", filter_key: str | None = None) -> list[str]:
    """Demo group names sorted by index (demo_0, demo_1, ..., demo_10). ``filter_key`` reads mask/<key>.

    Raises RobomimicFormatError (naming the file) when there is no ``data`` group, no ``mask/<filter_key>``, or
    when ``mask/<filter_key>`` lists demos that ``data/`` does not have (all missing names are listed).
    """
    if "data" not in f:
        raise RobomimicFormatError(f"{path}: no group 'data' (top-level keys: {list(f)})")
    if filter_key is not None:
        if "mask" not in f or filter_key not in f["mask"]:
            have = list(f["mask"]) if "mask" in f else []
            raise RobomimicFormatError(f"{path}: no filter key mask/{filter_key} (have: {have})")
        names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(f["mask"][filter_key][()]).reshape(-1)
        ]
        missing = [n for n in names if n not in f["data"]]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise RobomimicFormatError(
                f"{path}: filter key mask/{filter_key} lists {len(missing)} demo(s) that data/ does not have: {shown} "
                f"(data/ has {len([n for n in f['data'] if _DEMO_RE.match(n)])} demo_<i> groups); expected every "
                f"name in mask/{filter_key} to be a group under data/"
            )
    else:
        names = [n for n in f["data"] if _DEMO_RE.match(n)]
    return sorted(names, key=lambda n: int(_DEMO_RE.match(n).group(1)) if _DEMO_RE.match(n) else 1 << 60)


def read_demo(f, name: str, obs_keys: Sequence[str], path="<hdf5>", action_key: str = "actions") -> dict:
    """One demo as {obs key: array, 'actions': array, 'states': array (if present)}.

    Raises RobomimicFormatError naming the file and ``data/<name>/...`` when the demo, its ``obs`` group, an
    observation key or the action key is missing.
    """
    if name not in f["data"]:
        raise RobomimicFormatError(f"{path}: no demo data/{name}")
    g = f["data"][name]
    if not isinstance(g, h5py.Group):
        raise RobomimicFormatError(f"{path}: data/{name} is a dataset, expected a demo group (actions, obs/...)")
    out = {}
    if "obs" not in g:
        raise RobomimicFormatError(f"{path}: data/{name} has no 'obs' group (keys: {list(g)})")
    for k in obs_keys:
        if k not in g["obs"]:
            raise RobomimicFormatError(
                f"{path}: observation key {k!r} not in data/{name}/obs (available: {sorted(g['obs'])})"
            )
        out[k] = np.asarray(g["obs"][k][()])
    if action_key not in g:
        raise RobomimicFormatError(f"{path}: data/{name} has no {action_key!r} (keys: {sorted(g)})")
    out["actions"] = np.asarray(g[action_key][()])
    if "states" in g:
        out["states"] = np.asarray(g["states"][()])
    return out


def robomimic_to_replay_buffer(
    path,
    obs_keys: Sequence[str],
    concat_obs: Mapping[str, Sequence[str]] | None = None,
    abs_action: bool = False,
    action_dim: int | None = 14,
    out_path=None,
    overwrite: bool = False,
    action_key: str = "actions",
    filter_key: str | None = None,
    zarr_format: int = 2,
):
    """Convert a robomimic hdf5 to Diffusion Policy's ReplayBuffer layout.

    * ``obs_keys``: robomimic obs keys copied to ``data/<key>`` (images stay uint8 HWC, low-dim float32).
    * ``concat_obs``: e.g. ``{"obs": ["object", "robot0_eef_pos", ...]}`` adds ``data/obs`` = concat per step
      (Diffusion Policy's low-dim obs).
    * actions go to ``data/action``; with ``abs_action`` the 14-dim [pos, axis-angle, gripper] x 2 become 20-dim
      [pos, rot6d, gripper] x 2. ``action_dim`` (the file's per-step action size, 14 for Transport) is checked.

    Empty or malformed demos are skipped with one ``DataSanityWarning`` naming the file and each demo and why:
    0 steps, actions not (N, A), observation/action step counts that disagree, or a requested key missing from
    some (not all) demos.

    Returns the ReplayBuffer (numpy backend); with ``out_path`` it is also written there (zarr, atomically).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RobomimicFormatError (a KeyError; the message names the file): no ``data`` group; ``mask/<filter_key>``
            missing or listing demos that ``data/`` lacks (all named); a key missing from every demo; no usable
            demo left (each skipped demo named with the reason).
        ValueError: a demo's action dim differs from ``action_dim`` (file, demo and shapes named).
    """
    concat_obs = {k: list(v) for k, v in (concat_obs or {}).items()}
    needed = list(dict.fromkeys(list(obs_keys) + [c for v in concat_obs.values() for c in v]))
    rb = ReplayBuffer.create_empty_numpy()
    skipped: list[tuple[str, str, str]] = []  # (demo, kind, why)
    image_dtypes: dict[str, tuple] = {}  # image key -> (first demo, its dtype)
    first_missing: RobomimicFormatError | None = None
    with _open(path) as f:
        demos = list_demos(f, path, filter_key)
        if not demos:
            where = f"mask/{filter_key} lists no demos" if filter_key is not None else "no demo_<i> groups under data/"
            raise RobomimicFormatError(f"{path}: {where}")
        for name in demos:
            try:
                d = read_demo(f, name, needed, path, action_key)
            except RobomimicFormatError as e:  # a key missing in this demo: skipped unless missing everywhere
                first_missing = first_missing or e
                skipped.append((name, "missing", str(e).removeprefix(f"{path}: ")))
                continue
            act = d["actions"]
            n = int(act.shape[0]) if act.ndim else 0
            if act.size == 0 or n == 0:
                skipped.append((name, "empty", f"0 steps (data/{name}/{action_key} has shape {act.shape})"))
                continue
            if act.ndim != 2:
                skipped.append((name, "malformed", f"data/{name}/{action_key} has shape {act.shape}, expected (N, A)"))
                continue
            if action_dim is not None and act.shape[1] != action_dim:
                raise ValueError(f"{path}: data/{name}/{action_key} has shape {act.shape}, expected (N, {action_dim})")
            bad = [
                f"data/{name}/obs/{k} has {d[k].shape[0] if d[k].ndim else 0} steps"
                for k in needed
                if d[k].ndim == 0 or d[k].shape[0] != n
            ]
            if bad:
                skipped.append((name, "malformed", f"{', '.join(bad)}, but {action_key} has {n}"))
                continue
            ep = {}
            for k in obs_keys:
                a = d[k]
                if a.ndim == 4:  # images: one dtype kind across demonstrations (uint8 0..255 vs float)
                    first = image_dtypes.setdefault(k, (name, a.dtype))
                    if (first[1] == np.uint8) != (a.dtype == np.uint8):
                        raise ValueError(
                            f"{path}: data/{name}/obs/{k} is {a.dtype} but data/{first[0]}/obs/{k} is {first[1]}: "
                            "image dtypes are mixed across demonstrations (expected all uint8 0..255 or all float)"
                        )
                ep[k] = a if a.dtype == np.uint8 else a.astype(np.float32)
            for ck, parts in concat_obs.items():
                ep[ck] = np.concatenate([d[c].reshape(n, -1).astype(np.float32) for c in parts], axis=1)
            if abs_action:
                ep["action"] = abs_action_to_rot6d(act, f"{path}: data/{name}/{action_key}").astype(np.float32)
            else:
                ep["action"] = act.astype(np.float32)
            rb.add_episode(ep)
    if rb.n_episodes == 0:
        if first_missing is not None and all(kind == "missing" for _, kind, _ in skipped):
            raise first_missing  # missing in every demo: a wrong obs/action key rather than bad demos
        why = "; ".join(f"{n}: {w}" for n, _, w in skipped[:10]) + (
            f"; ... ({len(skipped)} in all)" if len(skipped) > 10 else ""
        )
        raise RobomimicFormatError(f"{path}: no usable demo (all {len(skipped)} skipped): {why}")
    if skipped:
        why = "; ".join(f"{n}: {w}" for n, _, w in skipped[:20]) + (
            f"; ... ({len(skipped)} in all)" if len(skipped) > 20 else ""
        )
        warnings.warn(
            f"{path}: skipped {len(skipped)} empty or malformed demo(s) of {len(demos)}: {why}",
            DataSanityWarning,
            stacklevel=2,
        )
    if out_path is not None:
        rb.save_to_path(out_path, zarr_format=zarr_format, overwrite=overwrite)
    return rb


def env_meta_action_mode(env_meta: Mapping) -> str | None:
    """ "delta" / "absolute" from an env_meta's controller config (old flat ``control_delta`` or robosuite 1.5's
    composite ``body_parts.<arm>.input_type``); None when the config does not say."""
    cc = (env_meta.get("env_kwargs") or {}).get("controller_configs") or {}
    if "control_delta" in cc:
        return "delta" if cc["control_delta"] else "absolute"
    for part in (cc.get("body_parts") or {}).values():
        if isinstance(part, Mapping) and "input_type" in part:
            return "delta" if part["input_type"] == "delta" else "absolute"
    return None


def replay_buffer_from_hdf5(
    path,
    obs_keys: Mapping[str, Sequence[str] | str],
    abs_action: bool,
    image_keys: Sequence[str] = (),
    filter_key: str | None = None,
):
    """The in-memory ReplayBuffer a task's dataset block needs, read straight from a robomimic hdf5 (official layout,
    as ``task.dataset.hdf5_path``): every hdf5 obs key named by the ``obs_keys`` source specs (``"object"``,
    ``"robot0_eef_pos[:2]"``) is copied under its own name, actions go to ``action`` (axis-angle -> rot6d with
    ``abs_action``). The file's ``env_args`` must be readable (the evaluation env is created from it), and its
    controller must match ``abs_action``."""
    # lazy: zarr_dataset loads torch + numba; this module is also imported by Transport env workers (envs/transport.py)
    from shortcut_policy.datasets.zarr_dataset import _as_list, parse_source

    meta = read_env_meta(path)  # clear error when env_args is missing
    mode = env_meta_action_mode(meta)
    want = "absolute" if abs_action else "delta"
    if mode is not None and mode != want:
        raise ValueError(
            f"{path}: env_args has {mode} actions but the task has abs_action={bool(abs_action)} "
            f"(expects {want}); use the matching file (low_dim.hdf5 = delta, low_dim_abs.hdf5 = absolute) "
            "or set task.abs_action and task.action_dim to match"
        )
    keys = list(dict.fromkeys(parse_source(s)[0] for v in obs_keys.values() for s in _as_list(v)))
    keys += [k for k in image_keys if k not in keys]
    rb = robomimic_to_replay_buffer(path, keys, abs_action=abs_action, action_dim=None, filter_key=filter_key)
    rb._source = str(path)
    return rb


# ---------------------------------------------------------------------------------------------- writing
class RobomimicHdf5Writer:
    """Write a robomimic hdf5 in the official layout. Written to a temporary file next to ``path`` and renamed
    into place on ``close()`` (an interrupted run leaves no half file at ``path``); an existing ``path`` is only
    replaced with ``overwrite=True``.

    >>> with RobomimicHdf5Writer("x.hdf5", env_meta) as w:
    ...     w.add_demo(obs={...}, actions=a, states=s)   # obs with N+1 rows -> obs / next_obs
    """

    def __init__(self, path, env_meta: Mapping, overwrite: bool = False, compress_images: bool = True):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass overwrite=True to replace it")
        self._target = AtomicPath(self.path)  # committed by close(), discarded by abort()
        self._tmp = self._target.tmp
        self._f = h5py.File(str(self._tmp), "w")
        self._data = self._f.create_group("data")
        self._env_meta = json.loads(json.dumps(env_meta))
        self._n = 0
        self._total = 0
        self._compress = compress_images
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _write(self, g, key, arr):
        """Create dataset ``key`` in group ``g``: uint8 image stacks (N, H, W, C) gzip-compressed (level 4, one chunk
        per frame) when ``compress_images``, everything else uncompressed."""
        arr = np.asarray(arr)
        if arr.dtype == np.uint8 and arr.ndim == 4 and self._compress:
            g.create_dataset(key, data=arr, compression="gzip", compression_opts=4, chunks=(1,) + arr.shape[1:])
        else:
            g.create_dataset(key, data=arr)

    def add_demo(
        self,
        obs: Mapping[str, np.ndarray],
        actions: np.ndarray,
        states: np.ndarray | None = None,
        rewards: np.ndarray | None = None,
        dones: np.ndarray | None = None,
        next_obs: Mapping[str, np.ndarray] | None = None,
        model_file: str | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Append ``demo_<i>``; returns its name. ``obs`` arrays have N rows (then ``next_obs`` may be given) or
        N+1 rows (the last one the final observation: obs = rows [:N], next_obs = rows [1:])."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer already closed")
        actions = np.asarray(actions)
        n = actions.shape[0]
        if actions.ndim != 2 or n < 1:
            raise ValueError(f"{self.path}: actions must be (N>=1, A), got {actions.shape}")
        o, no = {}, {}
        for k, v in obs.items():
            v = np.asarray(v)
            if v.shape[0] == n + 1:
                o[k], no[k] = v[:n], v[1:]
            elif v.shape[0] == n:
                o[k] = v
                if next_obs is not None and k in next_obs:
                    no[k] = np.asarray(next_obs[k])
                else:
                    no[k] = np.concatenate([v[1:], v[-1:]], axis=0)
            else:
                raise ValueError(f"{self.path}: obs[{k!r}] has {v.shape[0]} rows, expected {n} or {n + 1}")
        name = f"demo_{self._n}"
        g = self._data.create_group(name)
        g.attrs["num_samples"] = n
        if model_file is not None:
            g.attrs["model_file"] = model_file
        self._write(g, "actions", actions)
        if states is not None:
            states = np.asarray(states)
            if states.shape[0] != n:
                raise ValueError(f"{self.path}: states has {states.shape[0]} rows, actions {n}")
            self._write(g, "states", states)
        self._write(g, "rewards", np.zeros(n) if rewards is None else np.asarray(rewards, dtype=np.float64))
        if dones is None:
            dones = np.zeros(n, dtype=np.int64)
            dones[-1] = 1
        self._write(g, "dones", np.asarray(dones, dtype=np.int64))
        go, gno = g.create_group("obs"), g.create_group("next_obs")
        for k in o:
            self._write(go, k, o[k])
            self._write(gno, k, no[k])
        for k, v in (extra or {}).items():
            self._write(g, k, v)
        self._n += 1
        self._total += n
        return name

    def close(self, masks: Mapping[str, Iterable[str]] | None = None, val_ratio: float | None = None, seed: int = 0):
        """Finish: env_args/total attrs, optional ``mask/<key>`` filter keys (``val_ratio`` -> train/valid)."""
        if self._closed:
            return self.path
        self._data.attrs["env_args"] = json.dumps(self._env_meta)
        self._data.attrs["total"] = self._total
        masks = dict(masks or {})
        if val_ratio is not None and self._n > 1:
            names = [f"demo_{i}" for i in range(self._n)]
            n_val = max(1, int(round(val_ratio * self._n)))
            val = set(np.random.default_rng(seed).choice(self._n, size=n_val, replace=False).tolist())
            masks.setdefault("valid", [names[i] for i in sorted(val)])
            masks.setdefault("train", [names[i] for i in range(self._n) if i not in val])
        if masks:
            mg = self._f.create_group("mask")
            for k, names in masks.items():
                mg.create_dataset(k, data=np.array([str(n).encode() for n in names], dtype="S"))
        self._f.close()
        self._target.commit()
        self._closed = True
        return self.path

    def abort(self):
        """Close and delete the temporary file without touching ``path`` (an error while writing); no-op once closed."""
        if not self._closed:
            try:
                self._f.close()
            finally:
                self._target.discard()
                self._closed = True

    @property
    def n_demos(self) -> int:
        return self._n
