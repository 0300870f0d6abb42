"""Small helpers shared across the package (no package-internal imports: everything may import this).

* config access: :func:`to_plain`, :func:`cfg_get`, :func:`check_int`, :func:`import_attr`;
* atomic writes: :func:`atomic_path` (a temp path in the target's folder, renamed into place on success),
  :func:`atomic_write_text`, :func:`atomic_write_bytes`; temp names match :data:`TEMP_NAME_RE`, so the CLI can
  remove the ones a killed writer left behind;
* the machine: :func:`resolve_device`, :func:`available_cores`, :func:`default_workers`,
  :func:`limit_opencv_threads`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

# ``.<name>.tmp<pid>`` (or ``.<stem>.tmp<pid><suffix>`` when the writer needs the suffix): the temp files of
# :func:`atomic_path`. ``pid`` is the writer's process id, so a temp file whose writer is gone can be removed.
TEMP_NAME_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


def to_plain(cfg):
    """OmegaConf containers -> plain python dict/list (resolved); anything else is deep-copied, so callers may
    mutate the result without touching the caller's config."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)


def cfg_get(cfg, key, default=None):
    """``cfg[key]`` for a dict / DictConfig / attribute object; ``default`` when missing or None."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        v = cfg.get(key, default)
    else:
        v = getattr(cfg, key, default)
    return default if v is None else v


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, *, strings: bool = True) -> int:
    """An integer config value, or a clear error naming it (floats like 1e5 are accepted when integral).

    ``minimum`` / ``maximum`` are inclusive bounds. Strings holding an integer ("8") are accepted unless
    ``strings=False`` (config values may arrive as strings; an API argument such as a gym seed should not); bools
    and None never are. Raises ``ValueError`` naming ``name`` and the value.
    """
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not strings):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name}={value!r}: expected an integer")
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if maximum is not None and value > maximum or maximum is not None and minimum is not None and value < minimum:
        bounds = f"in [{minimum}, {maximum}]" if minimum is not None else f"<= {maximum}"
        raise ValueError(f"{name}={value}: expected an integer {bounds}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return int(value)


def import_attr(spec: str):
    """``"package.module:attr"`` (``attr`` may be dotted, e.g. ``Class.method``) -> the object.

    Raises ``ValueError`` when ``spec`` has no ``:``, ``ImportError`` / ``AttributeError`` when it names nothing.
    """
    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise ValueError(f"{spec!r}: expected 'module:attribute'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------------
# atomic writes
def temp_path(path, keep_suffix: bool = False) -> Path:
    """The temp sibling of ``path`` written before the rename: ``.<name>.tmp<pid>``, or with ``keep_suffix``
    ``.<stem>.tmp<pid><suffix>`` for writers that pick the format from the extension (``savefig``, PIL,
    ``np.savez``, which would otherwise append ``.npz``)."""
    path = Path(path)
    if keep_suffix and path.suffix:
        return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _remove(p: Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class AtomicPath:
    """Write ``path`` through a temp sibling (see :func:`atomic_path`); also usable without ``with``: a writer
    object that lives across calls keeps one and calls :meth:`commit` or :meth:`discard` itself."""

    def __init__(self, path, keep_suffix: bool = False):
        self.path = Path(path)
        self.tmp = temp_path(self.path, keep_suffix)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove(self.tmp)  # left by an earlier writer with this pid

    def commit(self) -> Path:
        """Rename the temp file or directory onto ``path`` (an existing directory at ``path`` is moved aside first
        and deleted after the rename). Raises ``FileNotFoundError`` when nothing was written to the temp path."""
        tmp, path = self.tmp, self.path
        if not (tmp.exists() or tmp.is_symlink()):
            raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
        if tmp.is_dir() and not tmp.is_symlink() and (path.exists() or path.is_symlink()):
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
        return path

    def discard(self) -> None:
        """Delete the temp file or directory (``path`` is left as it was)."""
        _remove(self.tmp)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.discard()
            return False
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise
        return False


def atomic_path(path, keep_suffix: bool = False) -> AtomicPath:
    """``with atomic_path(path) as tmp:`` write ``tmp`` (a file or a directory, e.g. a zarr store); on success
    it is renamed onto ``path`` (readers never see a half-written file), on an exception it is deleted and
    ``path`` is left untouched. The parent folder is created. ``keep_suffix``: see :func:`temp_path`."""
    return AtomicPath(path, keep_suffix)


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp sibling + rename); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def emit_benchmark_json(res: dict, out=None) -> str:
    """Finish a benchmark script's result: add the machine's 1-minute load average as ``load_after``, print the JSON
    (indent 1) and, when ``out`` is a path, write it there atomically. Returns the JSON text."""
    res["load_after"] = os.getloadavg()[0]
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text)
    return text


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp sibling + rename); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# the machine
def resolve_device(name="auto"):
    """``"auto"`` / None -> ``cuda`` when a GPU is visible, else ``cpu``; anything else -> ``torch.device(name)``
    (raises ``RuntimeError`` for a malformed name such as ``"gpu"``)."""
    import torch  # lazy: utils is imported by env workers and config code that never need torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_workers(n_jobs: int | None = None) -> int:
    """Worker processes for ``n_jobs`` independent jobs (episodes): one per available core, at most ``n_jobs``."""
    cores = available_cores()
    return cores if n_jobs is None else max(1, min(cores, int(n_jobs)))


def limit_opencv_threads() -> None:
    """Cap OpenCV's thread pool at one thread (in env worker processes, so parallel workers do not oversubscribe
    the cores); does nothing where OpenCV is missing."""
    try:
        import cv2  # lazy: OpenCV is only needed by the env workers that render

        cv2.setNumThreads(1)
    except Exception:  # noqa: BLE001 - a missing or broken OpenCV only costs speed
        pass


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (so ``kill`` stops a long-running
    command as gracefully as Ctrl-C); the previous handler is restored after. A no-op outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def all_finite(x) -> bool:
    """True when every entry of the torch tensor ``x`` (any shape, floating point) is finite.

    One reduction instead of :func:`torch.isfinite`'s elementwise passes: a NaN or inf entry makes the sum NaN or
    inf, so a finite sum proves every entry finite; only when the sum is not finite (a bad entry, or an overflow of
    the sum itself) is the exact elementwise test run. On a Push-T image batch (64 x 16 x 3 x 96 x 96 float32, before
    image fields were cut to the To frames) the elementwise checks had taken about a quarter of the training step."""
    import torch

    if not x.is_floating_point():
        return True
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())
