# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
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

.PHONY: venv sysdeps demo test test-slow clean-venv

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

demo: venv
	BIN=$(BIN) bash scripts/demo.sh

test: venv
	$(BIN)/python -m pytest -q -x --timeout=900

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
