"""`shortcut-policy [--debug] <verb> [hydra overrides]` — a thin dispatcher.

:func:`main` parses the command line and runs the verb with :func:`shortcut_policy.commands.runner.run_verb`, which
composes ``configs/<verb>.yaml``, claims the run directory (its rules are in :mod:`shortcut_policy.commands.runner`),
runs the command, writes ``metrics.json``; the CLI prints ``RESULT <json>`` last. ``bench <sub> key=value`` is
shorthand for ``bench what=<sub> <sub>.key=value`` (:func:`bench_shorthand`).

Errors reach the user as one line ``error: <problem and fix>`` on stderr with exit code 1 (130 on Ctrl-C);
``--debug`` as the first argument or ``SHORTCUT_POLICY_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import os
import re
import sys

from .commands.runner import (
    LEGACY_SIGNATURES,
    LOCK_NAME,
    MARKER_NAME,
    USAGE,
    VERBS,
    RunDirError,
    RunDirLock,
    check_run_dir_owner,
    clean_stale_temp_files,
    compose,
    make_run_dir,
    run_verb,
)

# the run-directory machinery lives in the command layer (commands.runner); re-exported for callers of the CLI
__all__ = [
    "LEGACY_SIGNATURES",
    "LOCK_NAME",
    "MARKER_NAME",
    "USAGE",
    "VERBS",
    "LineStream",
    "RunDirError",
    "RunDirLock",
    "bench_shorthand",
    "check_run_dir_owner",
    "clean_stale_temp_files",
    "compose",
    "format_error",
    "main",
    "make_run_dir",
    "run_verb",
]

_DEBUG_ENV = "SHORTCUT_POLICY_DEBUG"


# ---------------------------------------------------------------------------------------------------------
# one-line errors
_GL_PATTERN = re.compile(r"MUJOCO_GL|PYOPENGL|OpenGL|\bEGL\b|\begl\b|GLFW|OSMesa|osmesa|gladLoadGL|mjr_context", re.I)
_GL_FIX = (
    "the OpenGL backend cannot start: set MUJOCO_GL (and PYOPENGL_PLATFORM) to one this machine supports "
    "(egl needs a GPU driver, osmesa renders in software, glfw needs a display)"
)


def _one_line(text: str) -> str:
    """Collapse a multi-line message into one line."""
    parts = [p.strip() for p in str(text).splitlines()]
    out = " ".join(p for p in parts if p)
    return out


def format_error(e: BaseException) -> str:
    """The one-line message (without the ``error: `` prefix) for an exception that reaches the CLI: Hydra override
    and config-group errors say which override and list the valid options; missing files name the path; other
    errors keep their message and get a hint (OpenGL backend, ``--debug``)."""
    try:
        from hydra.errors import (
            ConfigCompositionException,
            HydraException,
            MissingConfigException,
            OverrideParseException,
        )
    except ImportError:  # pragma: no cover
        ConfigCompositionException = HydraException = MissingConfigException = OverrideParseException = ()
    if isinstance(e, OverrideParseException):
        lines = [p.strip() for p in str(e.message).splitlines() if p.strip()]
        url = next((p.split()[1] for p in lines if p.startswith("See ") and len(p.split()) > 1), None)
        reason = "; ".join(p for p in lines if not p.startswith("See ")) or "invalid syntax"
        return (
            f"cannot parse override {e.override!r}: {reason}; fix its syntax (key=value, +key=value adds a key, "
            f"~key deletes one; quote values with spaces, brackets or '=', e.g. \"checkpoint='epoch=0550.ckpt'\")"
            + (f", see {url}" if url else "")
        )
    if (
        isinstance(e, MissingConfigException)
        and getattr(e, "missing_cfg_file", None)
        and "/" in str(e.missing_cfg_file)
    ):
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        opts = getattr(e, "options", None)
        valid = f"; valid options: {', '.join(opts)}" if opts else ""
        return f"{group}={option}: no such option in config group '{group}' (no configs/{group}/{option}.yaml){valid}"
    if isinstance(e, ConfigCompositionException) or isinstance(e, HydraException):
        msg = _one_line(str(e))
        cause = e.__cause__
        if cause is not None and _one_line(str(cause)):
            msg += f" ({_one_line(str(cause)).split(' full_key:')[0]})"
        return msg or type(e).__name__
    if getattr(e, "user_error", False):
        return _one_line(str(e))
    if isinstance(e, FileNotFoundError):
        if e.filename is not None and e.strerror:
            return f"{e.filename}: {e.strerror.lower()}; check the path (relative paths start at {os.getcwd()})"
        return f"{_one_line(str(e))}; check the path"
    if isinstance(e, KeyError):
        arg = e.args[0] if e.args else ""
        if isinstance(arg, str) and " " in arg.strip():
            return _one_line(arg)
        return f"missing key {arg!r} (run shortcut-policy --debug ... to see where it was looked up)"
    msg = _one_line(str(e))
    if not isinstance(e, (ValueError, KeyError)) or not msg:
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    if _GL_PATTERN.search(msg):
        return f"{msg}; {_GL_FIX}"
    if not isinstance(e, (ValueError, KeyError)):
        msg += " (run shortcut-policy --debug ... for the traceback)"
    return msg


# `bench <sub> key=value`: the keys each sub-benchmark takes at the top level of its command line
BENCH_SHORTHAND = {
    "toy": {
        "dataset": "toy.dataset",
        "num_steps": "toy.num_steps",
        "batch_size": "toy.batch_size",
        "objectives": "toy.select",
    },
    "images": {"objectives": "images.select", "num_steps": "images.num_steps", "seed": "images.seed"},
    "policies": {
        k: f"policies.{k}"
        for k in (
            "task",
            "objectives",
            "seeds",
            "out",
            "nfe",
            "eval",
            "variants",
            "train_overrides",
            "latency_rounds",
            "only_finished",
            "num_steps",
            "distill",
        )
    },
}


def bench_shorthand(sub: str, overrides: list[str]) -> list[str]:
    """`bench toy dataset=moons objectives=[a,b]` -> ['what=toy', 'toy.dataset=moons', 'toy.select=[a,b]'];
    `bench policies task=T objectives=[...] seeds=[...] eval.n_episodes=100` -> policies.task=...,
    policies.objectives=..., policies.eval.n_episodes=100 (the first component of a dotted key is looked up)."""
    table = BENCH_SHORTHAND.get(sub, {})
    out = [f"what={sub}"]
    for o in overrides:
        key, eq, value = o.partition("=")
        bare = key.lstrip("+~")
        head, dot, rest = bare.partition(".")  # eval.n_episodes=100 -> policies.eval.n_episodes=100
        if eq and head in table:
            o = f"{key[: len(key) - len(bare)]}{table[head]}{dot}{rest}{eq}{value}"
        out.append(o)
    return out


def distill_shorthand(overrides: list[str]) -> list[str]:
    """`distill teacher=T objective=ode_distillation train.lr=1e-4` -> distill keys plus ``student_overrides=[...]``
    (see :func:`shortcut_policy.commands.distill.distill_shorthand`)."""
    from .commands.distill import distill_shorthand as _shorthand

    return _shorthand(overrides)


class LineStream:
    """Wraps stderr for a non-terminal log: a progress bar's carriage-return redraws become one line each."""

    def __init__(self, raw):
        self.raw, self._at_line_start = raw, True

    def write(self, s: str) -> int:
        """Write ``s`` with every carriage return turned into a newline and blank lines dropped; returns the length
        written."""
        s = s.replace("\r", "\n")
        if self._at_line_start:
            s = s.lstrip("\n")
        while "\n\n" in s:
            s = s.replace("\n\n", "\n")
        if s:
            self.raw.write(s)
            self._at_line_start = s.endswith("\n")
        return len(s)

    def flush(self) -> None:
        """Flush the wrapped stream."""
        self.raw.flush()

    def isatty(self) -> bool:
        """False: progress bars then redraw rarely, one line per update."""
        return False

    def __getattr__(self, name):  # fileno, encoding, ... of the wrapped stream
        return getattr(self.raw, name)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``[--debug] <verb> [overrides]``. Prints ``RESULT <json>`` and returns 0 on success; on an error
    prints one line ``error: ...`` to stderr and returns 1 (130 on Ctrl-C); with ``--debug`` or
    ``SHORTCUT_POLICY_DEBUG=1`` the exception propagates with its full traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(_DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        print("verbs: " + ", ".join(VERBS))
        return 0 if argv else 2
    verb, overrides = argv[0], argv[1:]
    # `bench toy dataset=moons` -> what=toy toy.dataset=moons (positional sub-command for bench)
    if verb == "bench" and overrides and "=" not in overrides[0]:
        overrides = bench_shorthand(overrides.pop(0), overrides)
    if verb == "distill":
        overrides = distill_shorthand(overrides)
    if not sys.stderr.isatty():  # progress bars in a log file: one line per update, not carriage returns
        sys.stderr = LineStream(sys.stderr)
    try:
        result = run_verb(verb, overrides)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if debug or e.code is None or isinstance(e.code, int):
            raise
        print(f"error: {_one_line(str(e.code))}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - every error reaches the user as one line (see --debug)
        if debug:
            raise
        print(f"error: {format_error(e)}", file=sys.stderr, flush=True)
        return 1
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
