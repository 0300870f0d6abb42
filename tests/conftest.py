"""Test-session settings: one torch/OpenMP thread per process (tests use tiny nets; on a shared or 2-core
machine extra threads only oversubscribe), headless rendering back-ends, wandb offline."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pusht_lowdim_zarr(tmp_path_factory):
    """A small synthetic Push-T zarr (4 episodes of 25-41 steps, no images) in Diffusion Policy's layout."""
    from shortcut_policy.datasets.pusht import write_synthetic_pusht_zarr

    p = tmp_path_factory.mktemp("data") / "pusht.zarr"
    write_synthetic_pusht_zarr(p, episode_lengths=(30, 25, 41, 33))
    return p
