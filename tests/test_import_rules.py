"""Layering rules, checked on the source (no imports, fast):

* the library (everything but shortcut_policy/cli.py and shortcut_policy/commands/) never imports the CLI, the
  commands or Hydra: commands call the library, not the other way round;
* package-internal imports are module-level: a function-local ``from shortcut_policy...`` / ``from .x`` import
  hides a dependency (or an import cycle) and is allowed only where listed below, with the reason.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ["shortcut_policy", "envs", "eval", "datasets", "configs"]
NOT_LIBRARY = {"shortcut_policy/cli.py"}
NOT_LIBRARY_DIRS = ("shortcut_policy/commands/",)

# the bench implementation that trains and evaluates through the CLI (run_verb); its verb function is in
# commands/bench.py, the implementation itself still calls the CLI
CLI_ALLOWED: set[str] = set()
# function-local internal imports that stay, and why
LOCAL_INTERNAL_ALLOWED = {
    # zarr_dataset (torch + numba) only when reading an hdf5 for training; env workers import robomimic
    "datasets/robomimic.py",
}
LOCAL_INTERNAL_ALLOWED_DIRS: tuple[str, ...] = ()


def _library_files():
    for d in LIBRARY_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel in NOT_LIBRARY or rel.startswith(NOT_LIBRARY_DIRS) or "__pycache__" in rel:
                continue
            yield rel, p


def _package_of(rel: str) -> str:
    """Dotted package of a library file (shortcut_policy.envs for envs/x.py, ...)."""
    top, *rest = rel.split("/")
    base = {"shortcut_policy": "shortcut_policy"}.get(top, f"shortcut_policy.{top}")
    return ".".join([base, *rest[:-1]])


def _imports(rel: str, path: Path):
    """(absolute module name, function-local?) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=rel)
    pkg = _package_of(rel)
    local_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_nodes |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in local_nodes
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, id(node) in local_nodes
            for a in node.names:  # `from . import cli`
                if not node.module:
                    yield f"{mod}.{a.name}", id(node) in local_nodes


def test_library_never_imports_the_cli_the_commands_or_hydra():
    bad = []
    for rel, path in _library_files():
        if rel in CLI_ALLOWED:
            continue
        for mod, _ in _imports(rel, path):
            if mod == "shortcut_policy.cli" or mod.startswith(("shortcut_policy.commands", "hydra")):
                bad.append(f"{rel}: imports {mod}")
    assert not bad, "\n".join(bad)


def test_internal_imports_are_module_level():
    bad = []
    for rel, path in _library_files():
        if rel in LOCAL_INTERNAL_ALLOWED or rel.startswith(LOCAL_INTERNAL_ALLOWED_DIRS):
            continue
        for mod, local in _imports(rel, path):
            if local and mod.startswith("shortcut_policy"):
                bad.append(f"{rel}: function-local import of {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("verb", ["train", "eval", "demos", "bench", "sample", "fid", "latents", "deploy", "export"])
def test_every_verb_lives_in_its_commands_module(verb):
    from shortcut_policy import cli

    assert cli.VERBS[verb] == (f"shortcut_policy.commands.{verb}", f"{verb}_command")
    assert (ROOT / "shortcut_policy" / "commands" / f"{verb}.py").is_file()
