"""Transport from pixels end to end at a tiny size: scripted-expert demonstrations with the four cameras -> robomimic
hdf5 + zarr -> train a few steps -> evaluate one short episode; and the evaluation env renders only the cameras the
policy uses."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import zarr

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

pytest.importorskip("robosuite", reason="robosuite is in the 'sim' extra")

from omegaconf import OmegaConf  # noqa: E402
from test_transport_env import _gl_available, _task_cfg  # noqa: E402
from tiny import tiny_train  # noqa: E402

from shortcut_policy import cli  # noqa: E402
from shortcut_policy.envs import transport as T  # noqa: E402
from shortcut_policy.policy import load_policy  # noqa: E402

CAMS = ["shouldercamera0_image", "robot0_eye_in_hand_image", "shouldercamera1_image", "robot1_eye_in_hand_image"]
STEPS = 16  # env steps per demonstration and per evaluation episode (two chunks of 8 actions)


@pytest.fixture(scope="module")
def gl():
    reason = _gl_available()
    if reason is not None:
        pytest.skip(reason)


def test_transport_image_demos_train_eval(gl, tmp_path):
    out = tmp_path / "transport_img"
    res = cli.run_verb(
        "demos",
        [
            "task=transport_image",
            "n_episodes=1",
            f"out={out}",
            "workers=1",
            f"+expert.max_steps={STEPS}",
            "+expert.keep_failed=true",
            f"run_dir={tmp_path / 'demos_run'}",
        ],
    )
    assert res["n_episodes"] == 1 and res["n_unsuccessful_kept"] == 1 and res["max_steps"] == STEPS
    # the official robomimic image layout: uint8 (T, 84, 84, 3) per camera, the camera list in env_args
    with h5py.File(out / "image_abs.hdf5", "r") as f:
        for k in CAMS:
            img = f["data/demo_0/obs"][k]
            assert img.shape == (STEPS, 84, 84, 3) and img.dtype == np.uint8, k
            assert img[()].std() > 1.0, f"{k}: blank camera"
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_kwargs"]["camera_names"] == [k[: -len("_image")] for k in CAMS]
    root = zarr.open(str(out / "image_abs.zarr"), mode="r")
    assert root["data"]["shouldercamera0_image"].shape[1:] == (84, 84, 3)
    assert root["data"]["action"].shape[1] == 20

    run = tmp_path / "train"
    tr = cli.run_verb(
        "train",
        [
            "task=transport_image",
            f"task.dataset.zarr_path={out / 'image_abs.zarr'}",
            "task.dataset.val_ratio=0.0",
            "task.encoder.feature_dim=16",
            "task.encoder.resnet_width=16",
            f"task.max_steps={STEPS}",
            *tiny_train(batch_size=4, warmup_steps=1),
            "train.num_steps=2",
            f"run_dir={run}",
        ],
    )
    assert tr["steps"] == 2
    ckpt = run / "checkpoints" / "last.ckpt"
    policy = load_policy(ckpt)
    assert sorted(policy.obs_encoder.image_keys) == sorted(CAMS)

    ev = cli.run_verb(
        "eval",
        [f"checkpoint={ckpt}", "steps=[1]", "n_episodes=1", "workers=1", "n_videos=0", f"run_dir={tmp_path / 'ev'}"],
    )
    assert ev["n_episodes"] == 1
    assert 0.0 <= ev["success_rate@1"] <= 1.0 and np.isfinite(ev["mean_score@1"])


def test_evaluation_env_renders_only_the_policys_cameras(gl):
    cfg = OmegaConf.to_container(_task_cfg("transport_image"), resolve=True)
    for k in ("robot0_eye_in_hand_image", "shouldercamera1_image", "robot1_eye_in_hand_image"):
        del cfg["obs_shapes"][k]
    env = T.make_env(cfg, wrap=False, render=False)
    try:
        assert list(env.env.camera_names) == ["shouldercamera0"]
        obs, _ = env.reset(seed=100000)
        assert set(k for k in obs if k.endswith("_image")) == {"shouldercamera0_image"}
    finally:
        env.close()
    cfg_low = OmegaConf.to_container(_task_cfg("transport_lowdim"), resolve=True)
    env = T.make_env(cfg_low, wrap=False, render=False)
    try:  # a low-dim policy: no camera observations and no offscreen renderer at all
        assert not env.env.use_camera_obs and not env.env.has_offscreen_renderer
    finally:
        env.close()
