"""Running a verb: compose its config, claim its run directory, call its command (:func:`run_verb`).

The command layer's runtime, used by the CLI (:mod:`shortcut_policy.cli`) and by commands that run other verbs
(``bench policies`` trains through ``train``). Each verb has a config ``configs/<verb>.yaml`` (composed with Hydra's
compose API, so the usual ``key=value``, ``group=option``, ``+new=value`` overrides work) and a command function
``fn(cfg: DictConfig, run_dir: pathlib.Path) -> dict`` in ``shortcut_policy/commands/<verb>.py`` (:data:`VERBS`).

Run-directory rules (see :func:`run_verb`):

* one live command per run directory: an exclusive ``flock`` on ``<run_dir>/.lock`` (holding the pid) is held for
  the whole command; a second command on the same run_dir fails at once. The lock dies with its process, so a
  killed run can be resumed.
* a run directory belongs to the verb that created it (``run.json``); another verb pointed at it is refused
  instead of overwriting its ``config.yaml`` / ``metrics.json``. The same verb may reuse it (resume).
* an optional ``<fn>_preflight(cfg, run_dir)`` in the verb's module runs after the lock is taken and before
  anything is written; it may raise to refuse the command or return a dict of notes (RESULT ``preflight``).
* temporary files ``.<name>.tmp<pid>`` left by a killed atomic write (:func:`shortcut_policy.utils.atomic_path`)
  are removed at the next start.
"""

from __future__ import annotations

import datetime as _dt
import errno
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

from ..utils import TEMP_NAME_RE, atomic_write_text

# verb -> (module, command function): one module per verb in shortcut_policy/commands/
VERBS: dict[str, tuple[str, str]] = {
    "train": ("shortcut_policy.commands.train", "train_command"),
    "eval": ("shortcut_policy.commands.eval", "eval_command"),
    "demos": ("shortcut_policy.commands.demos", "demos_command"),
    "bench": ("shortcut_policy.commands.bench", "bench_command"),
    "sample": ("shortcut_policy.commands.sample", "sample_command"),
    "fid": ("shortcut_policy.commands.fid", "fid_command"),
    "latents": ("shortcut_policy.commands.latents", "latents_command"),
    "deploy": ("shortcut_policy.commands.deploy", "deploy_command"),
    "export": ("shortcut_policy.commands.export", "export_command"),
    "distill": ("shortcut_policy.commands.distill", "distill_command"),
    "import": ("shortcut_policy.commands.import_", "import_command"),
    "convert": ("shortcut_policy.commands.convert", "convert_command"),
    "serve": ("shortcut_policy.commands.serve", "serve_command"),
}

# per verb, `key=value` shorthands for a nested key: `deploy policy=remote` means policy.kind=remote
SHORTHANDS: dict[str, dict[str, str]] = {"deploy": {"policy": "policy.kind"}}

USAGE = (
    "usage: shortcut-policy [--debug] {" + "|".join(VERBS) + "} [hydra overrides ...]\n"
    "  --debug (or SHORTCUT_POLICY_DEBUG=1): show the full traceback of an error instead of one line"
)

LOCK_NAME = ".lock"  # flock target; holds the pid of the command running in the directory
MARKER_NAME = "run.json"  # {"verb": ..., "created": ..., "pid": ...}: the verb that owns the directory
# files that mark a directory made before run.json existed as another verb's
LEGACY_SIGNATURES: dict[str, tuple[str, ...]] = {"train": ("checkpoints",), "eval": ("per_seed.json", "per_seed.csv")}


class RunDirError(RuntimeError):
    """A run directory cannot be used by this command (in use, owned by another verb, unreadable marker).
    The message names the directory and the fix."""

    # exceptions with a true `user_error` attribute already name the problem and the fix: printed as they are
    user_error = True


def compose(verb: str, overrides: list[str] | None = None):
    """Compose configs/<verb>.yaml with overrides (also used by tests and the bench sub-commands)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="shortcut_policy.configs", version_base="1.3"):
            return hydra_compose(config_name=verb, overrides=overrides)
    except ConfigCompositionException as e:
        unknown = _unknown_key_error(verb, overrides, e)
        if unknown is None:
            raise
        raise unknown from None


def _unknown_key_error(verb: str, overrides: list[str], e: Exception) -> ValueError | None:
    """For Hydra's "Could not override 'a.b.c' ... not in struct": a ValueError naming the key, its group and the
    group's valid keys (composed without the bad override); None for any other composition error."""
    import re

    from omegaconf import OmegaConf

    m = re.search(r"Could not override '([^']+)'", str(e))
    if not m or "not in struct" not in f"{e} {e.__cause__}":
        return None
    key = m.group(1)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = compose(verb, rest)
    except Exception:  # noqa: BLE001 - another override is broken too: report the first problem as Hydra did
        return None
    parts = key.split(".")
    node, group = cfg, []
    for p in parts[:-1]:
        if not OmegaConf.is_dict(node) or p not in node:
            break
        node, group = node[p], group + [p]
    where = ".".join(group) or "the top level"
    valid = sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []
    name = f" ({node.get('name')})" if OmegaConf.is_dict(node) and node.get("name") else ""
    return ValueError(
        f"unknown config key {key!r}: {where}{name} has no key {parts[len(group)]!r}; valid keys of "
        f"{where}: {valid} (to add a new key on purpose: +{key}=...)"
    )


def _jsonable(x):
    """A command's result made JSON-ready: dict keys as strings, tuples as lists, 0-d tensors / arrays as Python
    scalars, non-finite floats as None, paths as strings (recursively)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def make_run_dir(cfg, verb: str) -> Path:
    """The command's run directory (``cfg.run_dir``, default ``runs/<verb>/<timestamp>``), created if needed."""
    run_dir = cfg.get("run_dir", None) if hasattr(cfg, "get") else None
    if not run_dir:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run_dir = Path("runs") / verb / stamp
    run_dir = Path(str(run_dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir={run_dir}: exists and is not a directory; choose another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ---------------------------------------------------------------------------------------------------------
# run-directory lock, ownership, stale temp files
def _is_main_rank() -> bool:
    """False in the non-zero ranks of a torchrun launch (they share rank 0's run_dir and lock)."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


class RunDirLock:
    """Exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` with the holder's pid written into it.

    ``acquire`` raises :class:`RunDirError` naming the run_dir and the holder's pid when another process holds
    it. The kernel drops the lock when the holding process exits or is killed, so a stale ``.lock`` file never
    blocks a resume. The file itself is left in place (deleting it would let two processes lock different files).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._f = None

    def acquire(self) -> "RunDirLock":
        """Take the lock (non-blocking) and write this process's pid into the lock file; returns self. Raises
        :class:`RunDirError` when another process holds it (naming its pid) or the file system has no ``flock``."""
        import fcntl

        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                f.seek(0)
                holder = (f.read().split() or [""])[0]
            except OSError:
                pass
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "pid unknown"
                raise RunDirError(
                    f"run_dir {self.run_dir} is in use by another shortcut-policy command ({who}, lock "
                    f"{self.path}); wait for it to finish or stop it, or choose another run_dir"
                ) from None
            raise RunDirError(
                f"run_dir {self.run_dir}: cannot lock {self.path} ({e.strerror or e}); use a run_dir "
                "on a file system that supports flock"
            ) from e
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        """Unlock and close (also done by the kernel when the process ends)."""
        if self._f is None:
            return
        import fcntl

        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        finally:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours counts as alive; another user's too)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def clean_stale_temp_files(run_dir) -> list[Path]:
    """Delete ``.<name>.tmp<pid>[.suffix]`` files (:data:`~shortcut_policy.utils.TEMP_NAME_RE`, left by a killed
    :func:`~shortcut_policy.utils.atomic_path` writer: config, metrics, checkpoints) in
    ``run_dir`` and ``run_dir/checkpoints`` whose writer pid is not a live process. Returns the removed paths."""
    run_dir = Path(run_dir)
    removed = []
    for d in (run_dir, run_dir / "checkpoints"):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            m = TEMP_NAME_RE.match(p.name)
            if m and p.is_file() and not p.is_symlink() and not _pid_alive(int(m["pid"])):
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


def _configs_dir() -> Path:
    """The folder of the packaged configs (``shortcut_policy.configs``)."""
    return Path(importlib.import_module("shortcut_policy.configs").__file__).parent


def _verb_config_keys(verb: str) -> set[str]:
    """Top-level keys of configs/<verb>.yaml, config groups of its defaults list included (run_dir excluded)."""
    import yaml

    path = _configs_dir() / f"{verb}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    keys = {str(k) for k in data if k != "defaults"}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            keys |= {str(k).split()[-1] for k in entry}
    return keys - {"run_dir"}


def _legacy_owner(run_dir: Path, verb: str) -> tuple[str | None, str]:
    """Owner verb of a directory with files but no run.json (made by an older version), and why; (None, '') when
    it cannot be told or the directory holds nothing of a run."""
    for owner, names in LEGACY_SIGNATURES.items():
        for name in names:
            if (run_dir / name).exists():
                return owner, f"it has {name}{'/' if (run_dir / name).is_dir() else ''}"
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None, ""
    import yaml

    try:
        old = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError):
        return None, ""
    if not isinstance(old, dict):
        return None, ""
    old_keys = {str(k) for k in old} - {"run_dir"}

    def score(v):
        keys = _verb_config_keys(v)
        return len(old_keys & keys) / max(1, len(old_keys | keys))

    scores = {v: score(v) for v in VERBS}
    best = max(scores, key=scores.get)
    if best != verb and scores[best] >= 0.5 and scores[best] > scores.get(verb, 0.0):
        return best, f"its config.yaml has the keys of configs/{best}.yaml"
    return None, ""


def _suggest_run_dir(run_dir: Path, verb: str) -> Path:
    """A run_dir to propose instead of one owned by another verb: a sibling named after ``verb`` when free, else
    ``<run_dir>-<verb>``."""
    cand = run_dir.parent / verb
    if run_dir.name != verb and not cand.exists():
        return cand
    return run_dir.with_name(f"{run_dir.name}-{verb}")


def check_run_dir_owner(run_dir, verb: str) -> str | None:
    """Refuse (:class:`RunDirError`) when ``run_dir`` belongs to a verb other than ``verb``: its ``run.json``
    says so, or, without one, an older run's files show it (``checkpoints/`` = train, ``per_seed.json`` = eval,
    or its config.yaml's keys match another verb's config). Returns the recorded owner (None when unmarked)."""
    run_dir = Path(run_dir)
    marker = run_dir / MARKER_NAME
    if marker.exists():
        try:
            owner = json.loads(marker.read_text())["verb"]
            if not isinstance(owner, str):
                raise TypeError(f"'verb' is {owner!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunDirError(
                f'{marker}: unreadable run marker ({e}); expected JSON like {{"verb": "train"}}: '
                "restore it, or choose another run_dir"
            ) from None
        why = f"{MARKER_NAME} says so"
        recorded = owner
    else:
        owner, why = _legacy_owner(run_dir, verb)
        recorded = None
    if owner is not None and owner != verb:
        raise RunDirError(
            f"run_dir {run_dir} belongs to a '{owner}' run ({why}); '{verb}' would overwrite its files "
            f"(config.yaml, metrics.json): choose another run_dir, e.g. "
            f"run_dir={_suggest_run_dir(run_dir, verb)}"
        )
    return recorded


def _write_marker(run_dir: Path, verb: str) -> None:
    """Write ``run.json`` ({"verb", "created", "pid"}) into ``run_dir`` atomically: the verb now owns the directory."""
    atomic_write_text(
        run_dir / MARKER_NAME,
        json.dumps(
            {"verb": verb, "created": _dt.datetime.now().isoformat(timespec="seconds"), "pid": os.getpid()}, indent=1
        ),
    )


_EMPTY_OVERRIDE = re.compile(r"^\+{0,2}(?P<key>[A-Za-z_][\w.\-/@]*)=$")


def _check_empty_overrides(verb: str, overrides: list[str]) -> None:
    """Refuse ``key=`` (no value) for a key whose config value is a number, bool, list or mapping: Hydra would set
    it to the empty string and the command would fail much later (``train.lr=`` -> a type error mid-setup)."""
    empty = [o for o in overrides if _EMPTY_OVERRIDE.match(o)]
    if not empty:
        return
    from omegaconf import DictConfig, ListConfig, OmegaConf

    try:
        base = compose(verb, [o for o in overrides if o not in empty])
    except Exception:  # noqa: BLE001 - the other overrides' own errors are reported by the real compose
        return
    for o in empty:
        key = _EMPTY_OVERRIDE.match(o)["key"]
        group_dir = _configs_dir() / key
        if group_dir.is_dir():
            options = sorted(p.stem for p in group_dir.glob("*.yaml"))
            raise ValueError(
                f"override {o!r}: no option given for config group '{key}'; valid options: {', '.join(options)}"
            )
        try:
            orig = OmegaConf.select(base, key, throw_on_missing=False)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(orig, DictConfig):
            raise ValueError(
                f"override {o!r}: no value given for {key}, which is a mapping in the {verb} config; "
                f"set its entries ({key}.<name>=value) or {key}=null"
            )
        if isinstance(orig, (bool, int, float, ListConfig)):
            shown = OmegaConf.to_container(orig) if isinstance(orig, ListConfig) else orig
            example = json.dumps(shown).replace(" ", "") if isinstance(shown, list) else json.dumps(shown)
            raise ValueError(
                f"override {o!r}: no value given for {key}, which is {example} in the {verb} config; "
                f"give a value ({key}={example}) or {key}=null"
            )


# ---------------------------------------------------------------------------------------------------------
def apply_shorthands(verb: str, overrides: list[str]) -> list[str]:
    """Rewrite the verb's :data:`SHORTHANDS`: ``deploy policy=remote`` -> ``policy.kind=remote`` (only a plain
    ``key=value`` with that exact key; ``policy.address=...`` and the like pass unchanged)."""
    table = SHORTHANDS.get(verb, {})
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key in table and not value.lstrip().startswith("{"):
            o = f"{table[key]}={value}"
        out.append(o)
    return out


def run_verb(verb: str, overrides: list[str] | None = None) -> dict:
    """Run one verb: compose its config, lock and claim the run directory, call the verb's preflight hook, save
    config.yaml, run the command, save metrics.json; returns the (JSON-able) result.

    Order: compose -> mkdir run_dir -> lock ``.lock`` (rank 0) -> ownership check (``run.json``) -> remove stale
    temp files -> ``<fn>_preflight(cfg, run_dir)`` (may raise: nothing is written) -> run.json -> config.yaml ->
    command -> metrics.json -> unlock. Non-zero torchrun ranks skip the lock and the writes.
    """
    from omegaconf import OmegaConf

    if verb not in VERBS:
        raise SystemExit(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}. {USAGE.splitlines()[0]}")
    overrides = apply_shorthands(verb, list(overrides or []))
    _check_empty_overrides(verb, overrides)
    cfg = compose(verb, overrides)
    OmegaConf.to_yaml(cfg, resolve=True)  # an interpolation that does not resolve fails before anything is made
    run_dir = make_run_dir(cfg, verb)
    with _open_dict(cfg):
        cfg.run_dir = str(run_dir)
    main_rank = _is_main_rank()
    lock = RunDirLock(run_dir)
    if main_rank:
        lock.acquire()
    try:
        if main_rank:
            marked = check_run_dir_owner(run_dir, verb) is not None
            removed = clean_stale_temp_files(run_dir)
            if removed:
                print(
                    f"note: removed {len(removed)} stale temp file(s) of killed writes in {run_dir}: "
                    + ", ".join(str(p.relative_to(run_dir)) for p in removed),
                    file=sys.stderr,
                )
        module, fn = VERBS[verb]
        mod = importlib.import_module(module)
        command = getattr(mod, fn)
        preflight = getattr(mod, fn + "_preflight", None)
        notes = preflight(cfg, run_dir) if preflight is not None else None
        if notes is not None and not isinstance(notes, dict):
            raise TypeError(
                f"{module}.{fn}_preflight returned {type(notes).__name__}; expected a dict of notes or None"
            )
        if notes:
            print(f"note: {verb} preflight: {json.dumps(_jsonable(notes), sort_keys=True)}", file=sys.stderr)
        if main_rank:
            if not marked:
                _write_marker(run_dir, verb)
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        result = command(cfg, run_dir) or {}
        if notes:
            result = {**result, "preflight": notes}
        result = _jsonable(result)
        if main_rank:
            atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2))
        return result
    finally:
        lock.release()


class _open_dict:
    """``with _open_dict(cfg):`` OmegaConf's ``open_dict`` (new keys may be added to a struct config), lazily."""

    def __init__(self, cfg):
        from omegaconf import open_dict

        self._ctx = open_dict(cfg)

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *a):
        return self._ctx.__exit__(*a)
