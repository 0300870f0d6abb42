# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing (so does `make lint`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128) to pick a specific torch build.
TORCH_INDEX_URL ?=
EXTRAS ?= sim,deploy,fid,dev
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export WANDB_MODE ?= offline

.PHONY: venv sysdeps demo test test-slow lint clean-venv

# `make lint`: what the linters check (tests and scripts are formatted and linted too; docstring coverage is measured
# on the installed package's sources)
LINT_PATHS := shortcut_policy envs datasets eval tests scripts
DOC_PATHS := shortcut_policy envs datasets eval
INTERROGATE_OPTS := --ignore-init-method --ignore-init-module --ignore-magic --ignore-private \
	--ignore-nested-functions --ignore-nested-classes --ignore-property-decorators

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first: an unpinned torch with none installed pulls several GB of CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: sysdeps $(BIN)/.installed

# Debian libraries for MuJoCo offscreen rendering (EGL / OSMesa) and opencv; skipped when present or not root.
sysdeps:
	@bash scripts/install_sysdeps.sh

# the demo's clock starts before the .venv is built: on a fresh clone its 15 minutes include the installation
demo:
	@T0=$$(date +%s); $(MAKE) --no-print-directory venv && BIN=$(BIN) DEMO_T0=$$T0 bash scripts/demo.sh

test: venv
	$(BIN)/python -m pytest -q -x --timeout=900

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# Not part of `make test`. The tools are pinned in the `dev` extra; a venv built without it (EXTRAS=...) gets them here.
lint: venv
	@for t in ruff lint-imports interrogate; do test -x $(BIN)/$$t || { $(BIN)/python -m pip install -q -e ".[dev]" && break; }; done
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/python scripts/lint_imports.py
	$(BIN)/interrogate --fail-under 80 $(INTERROGATE_OPTS) $(DOC_PATHS)

clean-venv:
	rm -rf $(VENV)
