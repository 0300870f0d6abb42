"""Run import-linter (``lint-imports``) on the package as it is installed.

envs/, datasets/ and eval/ are installed as ``shortcut_policy.envs`` / ``.datasets`` / ``.eval`` through
``[tool.setuptools] package-dir`` in pyproject.toml. grimp, the import graph builder behind import-linter, finds the
modules of a package by walking the package's own folder, so on the editable install (and on the source tree) it sees
shortcut_policy/ only and would silently leave those three sub-packages out of every contract. This script lays the
source files out as they are installed (``.lint-imports/shortcut_policy/{envs,datasets,eval,...}``, plain copies,
rebuilt on every run) and runs ``lint-imports`` there with the repository's pyproject.toml, so the contracts see every
module under its installed name.

    python scripts/lint_imports.py [lint-imports options, e.g. --verbose]

Exits with lint-imports' exit code (0: every contract kept); stops with an error when ``package-dir`` maps a package to
a folder that does not exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".lint-imports"


def installed_layout(pyproject: Path) -> dict[str, Path]:
    """{dotted package: source folder} from ``[tool.setuptools] package-dir`` (the root package maps to itself)."""
    cfg = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    mapping = {pkg: ROOT / folder for pkg, folder in cfg.get("package-dir", {}).items()}
    for pkg in cfg.get("packages", []):
        top = pkg.split(".")[0]
        mapping.setdefault(top, ROOT / top)
    return mapping


def build_tree(mapping: dict[str, Path]) -> int:
    """Copy every .py file of each mapped folder to ``OUT/<package path>``; returns the number of files."""
    if OUT.exists():
        shutil.rmtree(OUT)
    copied = set()
    # deepest packages last, so that a sub-package's own mapping wins over its parent's folder walk
    for pkg, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        if not folder.is_dir():
            sys.exit(f"lint_imports: package-dir maps {pkg} to {folder}, which is not a folder")
        dest = OUT.joinpath(*pkg.split("."))
        for src in folder.rglob("*.py"):
            if "__pycache__" in src.parts:
                continue
            target = dest / src.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            copied.add(target)
    (OUT / ".gitignore").write_text("*\n")
    return len(copied)


def main(argv: list[str]) -> int:
    """Build the installed layout and run lint-imports in it; returns its exit code."""
    n = build_tree(installed_layout(ROOT / "pyproject.toml"))
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint) if lint.exists() else "lint-imports", str(ROOT / "pyproject.toml"), "--no-cache", *argv]
    print(f"lint-imports on the installed layout ({n} files in {OUT.relative_to(ROOT)})", flush=True)
    env = {**os.environ, "PYTHONPATH": str(OUT)}
    return subprocess.call(cmd, cwd=OUT, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
