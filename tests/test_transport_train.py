"""Transport policies through the shared CLI: a robomimic hdf5 in the official layout (old flat controller config in
its env_args, absolute axis-angle actions) trains directly, and the evaluation env comes from the file's env_args."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

pytest.importorskip("robosuite", reason="robosuite is in the 'sim' extra")

from tiny import tiny_train

from shortcut_policy import cli  # noqa: E402
from shortcut_policy.datasets.robomimic import RobomimicHdf5Writer, read_env_meta  # noqa: E402
from shortcut_policy.envs import transport as T  # noqa: E402
from shortcut_policy.envs.experts.transport import _recorded_to_demo, run_expert_episode  # noqa: E402
from shortcut_policy.policy import load_policy  # noqa: E402

TINY = [
    *tiny_train(batch_size=4, warmup_steps=1),
    "train.num_steps=2",
]


@pytest.fixture(scope="module")
def official_hdf5(tmp_path_factory):
    """Two short expert episodes from the real env, written like the official low_dim_abs.hdf5: 14-dim absolute
    axis-angle actions, env_args with robosuite <= 1.4's flat OSC_POSE config and control_delta=False, and
    the official env_args marker ``"type": 1``."""
    d = tmp_path_factory.mktemp("robomimic")
    env = T.TransportEnv(obs_keys=list(T.LOWDIM_SHAPES), enable_render=False, lite_physics=True)
    meta = T.default_env_meta(abs_action=True)
    assert meta["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"  # the old layout, converted on load
    path = d / "low_dim_abs.hdf5"
    with RobomimicHdf5Writer(path, meta) as w:
        for seed in (0, 1):
            r = run_expert_episode(seed, max_steps=24, env=env, record=True)
            demo = _recorded_to_demo(r["record"], ())
            w.add_demo(obs=demo["obs"], actions=demo["actions_abs"], states=demo["states"], rewards=demo["rewards"])
    env.close()
    return path


def test_official_hdf5_trains_without_conversion(official_hdf5, tmp_path):
    res = cli.run_verb(
        "train",
        [
            "task=transport_lowdim",
            f"task.dataset.hdf5_path={official_hdf5}",
            "task.dataset.zarr_path=null",
            "task.dataset.val_ratio=0.0",
            *TINY,
            f"run_dir={tmp_path}",
        ],
    )
    assert res["steps"] == 2
    policy = load_policy(tmp_path / "checkpoints" / "last.ckpt")
    assert policy.action_dim == 20 and policy.obs_encoder.obs_shapes["obs"] == (59,)
    # the evaluation env is built from the file's env_args (absolute controller, world frame)
    task = policy.cfg.task
    assert T.env_meta_from_task_cfg(task) == read_env_meta(official_hdf5)
    env = T.make_env(task, wrap=True, render=False)
    try:
        obs, _ = env.reset(seed=100000)
        act = policy.predict_action({"obs": obs["obs"][None]}, steps=1)
        assert act.shape == (1, 8, 20) and np.isfinite(act).all()
        obs, *_ = env.step(act[0])  # absolute actions execute in the env made from the hdf5
        assert obs["obs"].shape == (2, 59)
    finally:
        env.close()


def test_hdf5_errors_name_file_and_key(official_hdf5, tmp_path):
    base = ["task=transport_lowdim", "task.dataset.zarr_path=null", *TINY, f"run_dir={tmp_path}"]
    bad_key = ["task.dataset.obs_keys={obs:[object,robot0_eef_vel]}"]
    with pytest.raises(KeyError, match=r"robot0_eef_vel.*not in data/demo_0/obs"):
        cli.run_verb("train", base + [f"task.dataset.hdf5_path={official_hdf5}"] + bad_key)
    # a delta-action file for an absolute-action task
    delta = tmp_path / "low_dim.hdf5"
    with h5py.File(official_hdf5, "r") as src, h5py.File(delta, "w") as dst:
        src.copy("data", dst)
        m = json.loads(dst["data"].attrs["env_args"])
        m["env_kwargs"]["controller_configs"]["control_delta"] = True
        dst["data"].attrs["env_args"] = json.dumps(m)
    with pytest.raises(ValueError, match=r"low_dim.hdf5: env_args has delta actions.*abs_action=True"):
        cli.run_verb("train", base + [f"task.dataset.hdf5_path={delta}"])
    # no env_args at all
    with h5py.File(delta, "a") as f:
        del f["data"].attrs["env_args"]
    with pytest.raises(KeyError, match=r"low_dim.hdf5: data.attrs has no 'env_args'"):
        cli.run_verb("train", base + [f"task.dataset.hdf5_path={delta}"])
