"""Robomimic hdf5 <-> zarr and the axis-angle <-> rot6d conversions (no simulator needed)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from shortcut_policy.datasets.robomimic import (
    RobomimicFormatError,
    RobomimicHdf5Writer,
    abs_action_from_rot6d,
    abs_action_to_rot6d,
    axis_angle_to_matrix,
    axis_angle_to_rot6d,
    list_demos,
    matrix_to_axis_angle,
    matrix_to_rot6d,
    read_env_meta,
    robomimic_to_replay_buffer,
    rot6d_to_axis_angle,
    rot6d_to_matrix,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"
LOWDIM = {
    "object": 41,
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_gripper_qpos": 2,
    "robot1_eef_pos": 3,
    "robot1_eef_quat": 4,
    "robot1_gripper_qpos": 2,
}
ORDER = list(LOWDIM)


def _random_rotvecs(rng, n):
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return axis * rng.uniform(0, np.pi - 1e-3, (n, 1))


def test_rot6d_is_pytorch3d_rows_and_round_trips():
    rng = np.random.default_rng(0)
    aa = _random_rotvecs(rng, 500)
    R = axis_angle_to_matrix(aa)
    assert np.allclose(R @ np.swapaxes(R, -1, -2), np.eye(3), atol=1e-10)
    assert np.allclose(np.linalg.det(R), 1.0)
    d6 = axis_angle_to_rot6d(aa)
    assert d6.shape == (500, 6)
    assert np.allclose(d6, R[:, :2, :].reshape(500, 6))  # rows 0 and 1, flattened (pytorch3d)
    assert np.allclose(rot6d_to_matrix(d6), R, atol=1e-10)
    assert np.allclose(rot6d_to_axis_angle(d6), aa, atol=1e-8)  # angles < pi: rotvec is unique
    # Gram-Schmidt inverse turns any (non-degenerate) 6-vector into a rotation
    R2 = rot6d_to_matrix(d6 + 0.1 * rng.standard_normal(d6.shape))
    assert np.allclose(R2 @ np.swapaxes(R2, -1, -2), np.eye(3), atol=1e-10)
    assert np.allclose(np.linalg.det(R2), 1.0)
    # known value: 90 degrees about z
    Rz = axis_angle_to_matrix(np.array([0, 0, np.pi / 2]))
    assert np.allclose(Rz, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    assert np.allclose(matrix_to_rot6d(Rz), [0, -1, 0, 1, 0, 0], atol=1e-12)
    assert np.allclose(matrix_to_axis_angle(np.eye(3)), 0)
    assert np.allclose(axis_angle_to_matrix(np.zeros(3)), np.eye(3))


def test_abs_action_conversion_dims_and_round_trip():
    rng = np.random.default_rng(1)
    a = np.concatenate(
        [
            rng.uniform(-0.5, 0.5, (20, 3)),
            _random_rotvecs(rng, 20),
            rng.uniform(-1, 1, (20, 1)),
            rng.uniform(-0.5, 0.5, (20, 3)),
            _random_rotvecs(rng, 20),
            rng.uniform(-1, 1, (20, 1)),
        ],
        1,
    )
    b = abs_action_to_rot6d(a)
    assert b.shape == (20, 20)
    assert np.allclose(b[:, :3], a[:, :3]) and np.allclose(b[:, 9], a[:, 6]) and np.allclose(b[:, 19], a[:, 13])
    assert np.allclose(abs_action_from_rot6d(b), a, atol=1e-8)
    with pytest.raises(ValueError, match="multiple of 7"):
        abs_action_to_rot6d(np.zeros((3, 15)))
    with pytest.raises(ValueError, match="multiple of 10"):
        abs_action_from_rot6d(np.zeros((3, 14)))


def _episode(rng, n, image=False):
    obs = {k: rng.standard_normal((n + 1, d)) for k, d in LOWDIM.items()}
    if image:
        obs["shouldercamera0_image"] = rng.integers(0, 255, (n + 1, 84, 84, 3), dtype=np.uint8)
    acts = np.concatenate(
        [
            rng.uniform(-0.3, 0.3, (n, 3)),
            _random_rotvecs(rng, n),
            rng.choice([-1.0, 1.0], (n, 1)),
            rng.uniform(-0.3, 0.3, (n, 3)),
            _random_rotvecs(rng, n),
            rng.choice([-1.0, 1.0], (n, 1)),
        ],
        1,
    )
    states = rng.standard_normal((n, 120))
    return obs, acts, states


def _env_meta():
    from shortcut_policy.envs.transport import default_env_meta

    return default_env_meta()


def test_hdf5_write_read_zarr_round_trip(tmp_path):
    from shortcut_policy.datasets.replay_buffer import ReplayBuffer

    rng = np.random.default_rng(2)
    path = tmp_path / "low_dim.hdf5"
    lengths = [7, 12, 5, 9, 11, 6, 8, 10, 5, 7, 9, 6]  # 12 demos: demo_10 sorts after demo_9
    eps = [_episode(rng, n, image=True) for n in lengths]
    with RobomimicHdf5Writer(path, _env_meta()) as w:
        for obs, acts, states in eps:
            w.add_demo(obs=obs, actions=acts, states=states)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"

    # official layout
    with h5py.File(path, "r") as f:
        assert json.loads(f["data"].attrs["env_args"])["env_name"] == "TwoArmTransport"
        assert f["data"].attrs["total"] == sum(lengths)
        names = list_demos(f, path)
        assert names == [f"demo_{i}" for i in range(12)]
        g = f["data/demo_3"]
        assert g.attrs["num_samples"] == lengths[3]
        for k in ("actions", "states", "rewards", "dones", "obs", "next_obs"):
            assert k in g
        assert g["dones"][-1] == 1 and g["dones"][:-1].sum() == 0
        np.testing.assert_allclose(g["next_obs/object"][:], eps[3][0]["object"][1:])
        np.testing.assert_allclose(g["obs/object"][:], eps[3][0]["object"][:-1])
        assert g["obs/shouldercamera0_image"].dtype == np.uint8
    assert read_env_meta(path)["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"

    # -> zarr (delta actions, low-dim concat + an image key)
    out = tmp_path / "low_dim.zarr"
    rb = robomimic_to_replay_buffer(path, list(LOWDIM) + ["shouldercamera0_image"], {"obs": ORDER}, out_path=out)
    assert rb.n_episodes == 12
    assert list(rb.episode_ends) == list(np.cumsum(lengths))
    rb2 = ReplayBuffer.copy_from_path(out)
    assert sorted(rb2.keys()) == sorted(list(LOWDIM) + ["shouldercamera0_image", "obs", "action"])
    ep = rb2.get_episode(3)
    np.testing.assert_allclose(ep["action"], eps[3][1].astype(np.float32))
    np.testing.assert_allclose(ep["obs"], np.concatenate([eps[3][0][k][:-1] for k in ORDER], 1).astype(np.float32))
    assert ep["obs"].shape[1] == 59
    assert ep["shouldercamera0_image"].dtype == np.uint8
    np.testing.assert_array_equal(ep["shouldercamera0_image"], eps[3][0]["shouldercamera0_image"][:-1])
    with pytest.raises(FileExistsError):
        robomimic_to_replay_buffer(path, ["object"], out_path=out)

    # abs actions -> rot6d (20)
    rb3 = robomimic_to_replay_buffer(path, ["object"], abs_action=True)
    a = rb3.get_episode(0)["action"]
    assert a.shape == (lengths[0], 20)
    np.testing.assert_allclose(abs_action_from_rot6d(a), eps[0][1], atol=1e-5)


def test_zarr_feeds_sequence_dataset_with_task_config(tmp_path):
    from omegaconf import OmegaConf

    from shortcut_policy.datasets.zarr_dataset import SequenceDataset

    rng = np.random.default_rng(3)
    path = tmp_path / "low_dim_abs.hdf5"
    with RobomimicHdf5Writer(path, _env_meta()) as w:
        for n in (30, 25, 40):
            obs, acts, states = _episode(rng, n)
            w.add_demo(obs=obs, actions=acts, states=states)
    out = tmp_path / "low_dim_abs.zarr"
    robomimic_to_replay_buffer(path, list(LOWDIM), abs_action=True, out_path=out)
    task = OmegaConf.load(CONFIGS / "transport_lowdim.yaml")
    d = OmegaConf.to_container(task.dataset, resolve=True)
    d["zarr_path"] = str(out)
    assert d.pop("hdf5_path") is None and d.pop("hdf5_filter_key") is None  # read by policy.build_dataset only
    assert d.pop("lerobot_path") is None and d.pop("lerobot_obs_keys") is None  # likewise
    ds = SequenceDataset(
        horizon=task.horizon,
        n_obs_steps=task.n_obs_steps,
        n_action_steps=task.n_action_steps,
        **{k: v for k, v in d.items()},
    )
    s = ds[0]
    assert tuple(s["obs"]["obs"].shape) == (16, 59) and tuple(s["action"].shape) == (16, task.action_dim)
    norm = ds.get_normalizer()
    x = norm["obs"].normalize(s["obs"]["obs"])
    assert float(x.abs().max()) <= 1.0 + 1e-5


def test_writer_refuses_overwrite_and_writes_masks(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "x.hdf5"
    path.write_text("existing")
    with pytest.raises(FileExistsError, match="overwrite"):
        RobomimicHdf5Writer(path, _env_meta())
    w = RobomimicHdf5Writer(path, _env_meta(), overwrite=True)
    for _ in range(20):
        obs, acts, states = _episode(rng, 4)
        w.add_demo(obs=obs, actions=acts, states=states)
    w.close(val_ratio=0.1)
    with h5py.File(path, "r") as f:
        train = [n.decode() for n in f["mask/train"][:]]
        valid = [n.decode() for n in f["mask/valid"][:]]
    assert len(valid) == 2 and len(train) == 18 and not set(train) & set(valid)
    with h5py.File(path, "r") as f:
        assert list_demos(f, path, filter_key="valid") == sorted(valid, key=lambda n: int(n[5:]))
    # an aborted writer leaves nothing behind
    w = RobomimicHdf5Writer(tmp_path / "y.hdf5", _env_meta())
    w.abort()
    assert not (tmp_path / "y.hdf5").exists() and not list(tmp_path.glob(".y.hdf5*"))


def test_clear_errors_name_file_and_key(tmp_path):
    rng = np.random.default_rng(5)
    bad = tmp_path / "no_env_args.hdf5"
    with h5py.File(bad, "w") as f:
        g = f.create_group("data/demo_0")
        g.create_dataset("actions", data=np.zeros((3, 14)))
        g.create_dataset("obs/object", data=np.zeros((3, 41)))
    with pytest.raises(RobomimicFormatError) as e:
        read_env_meta(bad)
    assert str(bad) in str(e.value) and "env_args" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        read_env_meta(tmp_path / "nope.hdf5")

    path = tmp_path / "ok.hdf5"
    with RobomimicHdf5Writer(path, _env_meta()) as w:
        obs, acts, states = _episode(rng, 5)
        w.add_demo(obs=obs, actions=acts, states=states)
    with pytest.raises(RobomimicFormatError) as e:
        robomimic_to_replay_buffer(path, ["object", "agentview_image"])
    msg = str(e.value)
    assert "agentview_image" in msg and str(path) in msg and "data/demo_0/obs" in msg
    with pytest.raises(ValueError) as e:
        robomimic_to_replay_buffer(path, ["object"], action_dim=20)
    assert str(path) in str(e.value) and "actions" in str(e.value) and "20" in str(e.value)
    with pytest.raises(RobomimicFormatError, match="mask/train"):
        robomimic_to_replay_buffer(path, ["object"], filter_key="train")
    w = RobomimicHdf5Writer(tmp_path / "z.hdf5", _env_meta())
    with pytest.raises(ValueError, match="rows"):
        w.add_demo(obs={"object": np.zeros((9, 41))}, actions=np.zeros((5, 14)))
    w.abort()


def test_image_dtypes_mixed_across_demos_are_an_error(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "mixed.hdf5"
    with RobomimicHdf5Writer(path, _env_meta()) as w:
        for _ in range(2):
            obs, acts, states = _episode(rng, 4, image=True)
            w.add_demo(obs=obs, actions=acts, states=states)
    with h5py.File(path, "a") as f:  # demo_1's camera re-written as float 0..255 (another pipeline's export)
        img = f["data/demo_1/obs/shouldercamera0_image"][()].astype(np.float32)
        del f["data/demo_1/obs/shouldercamera0_image"]
        f["data/demo_1/obs"].create_dataset("shouldercamera0_image", data=img)
    with pytest.raises(
        ValueError,
        match=r"mixed\.hdf5: data/demo_1/obs/shouldercamera0_image is float32 but "
        r"data/demo_0/obs/shouldercamera0_image is uint8",
    ):
        robomimic_to_replay_buffer(path, ["object", "shouldercamera0_image"])
