"""PushTDataset / SequenceDataset on real zarr files, and the crop augmentation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shortcut_policy.datasets.pusht import PushTDataset, write_synthetic_pusht_zarr
from shortcut_policy.datasets.replay_buffer import ReplayBuffer
from shortcut_policy.datasets.sampler import downsample_mask, get_val_mask
from shortcut_policy.datasets.zarr_dataset import SequenceDataset, parse_source
from shortcut_policy.nets.augment import CropRandomizer, center_crop, random_crop

LENGTHS = (30, 17, 41, 12, 25, 20)


@pytest.fixture(scope="module")
def pusht(tmp_path_factory):
    path = tmp_path_factory.mktemp("pusht") / "pusht_cchi_v7_replay.zarr"
    data, ends = write_synthetic_pusht_zarr(path, episode_lengths=LENGTHS, seed=7, image_size=96)
    return path, data, ends


def _window_rows(ds, idx):
    """Buffer row of every window position (edge padding resolved)."""
    bs, be, ss, se = (int(v) for v in ds.sampler.indices[idx])
    rows = np.arange(bs - ss, bs - ss + ds.horizon)
    return np.clip(rows, bs, be - 1)


def test_keypoints_state_image_samples(pusht):
    path, data, ends = pusht
    kp = PushTDataset(path, obs_type="keypoints", val_ratio=0.2)
    st = PushTDataset(path, obs_type="state", val_ratio=0.2)
    im = PushTDataset(path, obs_type="image", val_ratio=0.2)
    assert kp.obs_shapes == {"obs": (20,)} and st.obs_shapes == {"obs": (5,)}
    assert im.obs_shapes == {"image": (3, 96, 96), "agent_pos": (2,)} and im.action_dim == 2
    for idx in (0, 5, len(kp) - 1):
        rows = _window_rows(kp, idx)
        s = kp[idx]
        assert set(s) == {"obs", "action"} and set(s["obs"]) == {"obs"}
        assert s["obs"]["obs"].shape == (16, 20) and s["obs"]["obs"].dtype == torch.float32
        want = np.concatenate([data["keypoint"][rows].reshape(16, 18), data["state"][rows, :2]], axis=1)
        np.testing.assert_array_equal(s["obs"]["obs"].numpy(), want)
        np.testing.assert_array_equal(s["action"].numpy(), data["action"][rows])
        np.testing.assert_array_equal(st[idx]["obs"]["obs"].numpy(), data["state"][rows])
        si = im[idx]
        # image fields hold only the To = 2 observation frames of the window
        assert si["obs"]["image"].shape == (2, 3, 96, 96) and si["obs"]["image"].dtype == torch.float32
        np.testing.assert_allclose(
            si["obs"]["image"].numpy(), data["img"][rows[:2]].transpose(0, 3, 1, 2) / 255.0, rtol=1e-6
        )
        np.testing.assert_array_equal(si["obs"]["agent_pos"].numpy(), data["state"][rows, :2])
    # first window of the first train episode is edge-padded with its first frame (pad_before = To - 1 = 1)
    s0 = kp[0]["obs"]["obs"]
    torch.testing.assert_close(s0[0], s0[1])
    # samples are copies: editing one does not change the next
    kp[3]["obs"]["obs"].zero_()
    assert kp[3]["obs"]["obs"].abs().sum() > 0


def test_splits_match_dp_masks_and_window_counts(pusht):
    path, data, ends = pusht
    n = len(LENGTHS)
    ds = PushTDataset(path, val_ratio=0.34, max_train_episodes=3, seed=42)
    train = downsample_mask(~get_val_mask(n, 0.34, 42), 3, 42)
    np.testing.assert_array_equal(ds.train_mask, train)
    assert len(ds) == sum(L - 16 + 1 + 7 + 1 for L, m in zip(LENGTHS, train) if m)
    val = ds.get_validation_dataset()
    np.testing.assert_array_equal(val.episode_mask, ~train)
    assert len(val) == sum(L - 7 for L, m in zip(LENGTHS, ~train) if m)
    assert len(ds) + len(val) == sum(L - 7 for L in LENGTHS)
    assert len(PushTDataset(path, split="val", val_ratio=0.34, max_train_episodes=3)) == len(val)
    assert len(PushTDataset(path, split="all")) == sum(L - 7 for L in LENGTHS)
    ep_of_row = np.searchsorted(ends, np.arange(ends[-1]), side="right")
    seen = {int(ep_of_row[_window_rows(val, i)[0]]) for i in range(len(val))}
    assert seen == set(np.flatnonzero(~train).tolist())


def test_normalizer_fit_on_whole_buffer(pusht):
    path, data, _ = pusht
    norm = PushTDataset(path, obs_type="keypoints", val_ratio=0.5).get_normalizer()
    allobs = np.concatenate([data["keypoint"].reshape(-1, 18), data["state"][:, :2]], axis=1)
    y = norm.normalize({"obs": allobs, "action": data["action"]})
    np.testing.assert_allclose(y["obs"].min(0).values.numpy(), -1, atol=1e-5)
    np.testing.assert_allclose(y["obs"].max(0).values.numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(y["action"].max(0).values.numpy(), 1, atol=1e-5)
    imnorm = PushTDataset(path, obs_type="image").get_normalizer()
    assert sorted(imnorm.keys()) == ["action", "agent_pos", "image"]
    x = torch.rand(2, 3, 96, 96)
    torch.testing.assert_close(imnorm["image"].normalize(x), 2 * x - 1)
    np.testing.assert_allclose(imnorm["agent_pos"].input_stats.max.numpy(), data["state"][:, :2].max(0))


def test_images_on_disk_equal_in_memory_and_loader(pusht):
    path, _, _ = pusht
    mem = PushTDataset(path, obs_type="image", images_in_memory=True)
    disk = PushTDataset(path, obs_type="image", images_in_memory=False)
    assert not isinstance(disk._fields["obs/image"], np.ndarray)
    for i in (0, 11):
        torch.testing.assert_close(mem[i]["obs"]["image"], disk[i]["obs"]["image"])
    batch = next(iter(DataLoader(disk, batch_size=4, shuffle=True, num_workers=1)))
    assert batch["obs"]["image"].shape == (4, 2, 3, 96, 96) and batch["action"].shape == (4, 16, 2)


def test_errors(pusht, tmp_path):
    path, _, _ = pusht
    with pytest.raises(ValueError, match=r"obs_type 'pixels'.*\['image', 'keypoints', 'state'\]"):
        PushTDataset(path, obs_type="pixels")
    lowdim = tmp_path / "noimg.zarr"
    write_synthetic_pusht_zarr(lowdim, episode_lengths=(20, 20), with_images=False)
    with pytest.raises(KeyError, match=r"noimg\.zarr.*\['img'\]"):
        PushTDataset(lowdim, obs_type="image")
    with pytest.raises(ValueError, match="split"):
        PushTDataset(lowdim, split="test")
    with pytest.raises(ValueError, match="bad source spec"):
        parse_source("state[:2")
    assert parse_source("state[1:-1]") == ("state", slice(1, -1))


def test_generic_sequence_dataset_robomimic_style(tmp_path):
    rng = np.random.default_rng(0)
    rb = ReplayBuffer.create_empty_numpy()
    for n in (40, 33, 50):
        rb.add_episode(
            {
                "object": rng.normal(size=(n, 41)).astype(np.float32),
                "robot0_eef_pos": rng.normal(size=(n, 3)).astype(np.float32),
                "robot0_eef_quat": rng.normal(size=(n, 4)).astype(np.float32),
                "action": rng.normal(size=(n, 20)).astype(np.float32),
                "agentview_image": rng.integers(0, 256, (n, 12, 10, 3)).astype(np.uint8),
            }
        )
    path = rb.save_to_path(tmp_path / "transport.zarr", zarr_format=3)
    ds = SequenceDataset(
        path,
        obs_keys={"obs": ["object", "robot0_eef_pos", "robot0_eef_quat"], "agentview_image": "agentview_image"},
        action_keys="action",
        image_keys=["agentview_image"],
        horizon=16,
        n_obs_steps=2,
        n_action_steps=8,
        val_ratio=0.02,
        normalizer_modes={"obs": "max_abs", "action": [["limits", 3], ["identity", 7], ["limits", 3], ["identity", 7]]},
    )
    assert ds.obs_shapes == {"obs": (48,), "agentview_image": (3, 12, 10)} and ds.action_dim == 20
    s = ds[0]
    rows = _window_rows(ds, 0)
    img = s["obs"]["agentview_image"]  # uint8 HWC -> float [0, 1] CHW
    assert img.dtype == torch.float32 and img.shape == (2, 3, 12, 10)  # the To = 2 observation frames only
    np.testing.assert_allclose(img.numpy(), rb["agentview_image"][rows[:2]].transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)
    want = np.concatenate([rb["object"][rows], rb["robot0_eef_pos"][rows], rb["robot0_eef_quat"][rows]], axis=1)
    np.testing.assert_array_equal(s["obs"]["obs"].numpy(), want)
    norm = ds.get_normalizer()
    assert torch.unique(norm["obs"].scale).numel() == 1
    torch.testing.assert_close(norm["action"].scale[3:10], torch.ones(7))
    with pytest.raises(KeyError, match="robot1_eef_pos"):
        SequenceDataset(path, obs_keys={"obs": ["robot1_eef_pos"]})


def test_crop_augmentation():
    x = torch.arange(2 * 3 * 3 * 96 * 96, dtype=torch.float32).reshape(2, 3, 3, 96, 96)
    c = center_crop(x, (84, 84))
    assert c.shape == (2, 3, 3, 84, 84)
    torch.testing.assert_close(c, x[..., 6:90, 6:90])
    g = torch.Generator().manual_seed(0)
    r = random_crop(x, (84, 84), generator=g)
    assert r.shape == (2, 3, 3, 84, 84)
    offsets = set()
    flat_x, flat_r = x.reshape(6, 3, 96, 96), r.reshape(6, 3, 84, 84)
    for i in range(6):  # each crop is a true window of its own image, all channels aligned
        top = int((flat_r[i, 0, 0, 0] - flat_x[i, 0, 0, 0]) // 96)
        left = int((flat_r[i, 0, 0, 0] - flat_x[i, 0, 0, 0]) % 96)
        assert 0 <= top <= 12 and 0 <= left <= 12
        torch.testing.assert_close(flat_r[i], flat_x[i, :, top : top + 84, left : left + 84])
        offsets.add((top, left))
    assert len(offsets) > 1  # independent per frame
    m = CropRandomizer((84, 84))
    assert m(x).shape == (2, 3, 3, 84, 84)
    m.eval()
    torch.testing.assert_close(m(x), c)
    with pytest.raises(ValueError, match="does not fit"):
        center_crop(x, (100, 84))


def test_image_resolution_other_than_the_task_names_both_shapes(tmp_path):
    from tiny import tiny_train

    from shortcut_policy import cli

    path = tmp_path / "small_img.zarr"
    write_synthetic_pusht_zarr(path, episode_lengths=(20, 20), seed=3, image_size=64)
    with pytest.raises(
        ValueError,
        match=r"small_img\.zarr: dataset observation shapes .*\(3, 64, 64\).* do not "
        r"match task\.obs_shapes .*\(3, 96, 96\)",
    ):
        cli.run_verb(
            "train",
            [
                "task=pusht_image",
                f"task.dataset.zarr_path={path}",
                *tiny_train(),
                "train.num_steps=1",
                f"run_dir={tmp_path / 'run'}",
            ],
        )
