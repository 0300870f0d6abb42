"""Data reliability: legacy nested zarr stores, the load-time sanity pass, and empty / malformed demos and episodes.

Every test writes real files (zarr stores, hdf5 files, image folders) in tmp_path; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
import warnings

import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from shortcut_policy.datasets.images import ImageFolderDataset
from shortcut_policy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError
from shortcut_policy.datasets.robomimic import RobomimicFormatError, robomimic_to_replay_buffer
from shortcut_policy.datasets.sanity import DataSanityError, DataSanityWarning, SanityReport, check_dataset
from shortcut_policy.datasets.zarr_dataset import SequenceDataset

OBS_KEYS = {"obs": ["state"]}


def _data(rng, lengths, img=False):
    n = int(sum(lengths))
    d = {
        "state": rng.uniform(-5, 5, (n, 5)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
    }
    if img:
        d["img"] = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    return d, np.cumsum(lengths).astype(np.int64)


def _window_rows(ds, idx):
    bs, be, ss, se = (int(v) for v in ds.sampler.indices[idx])
    return np.clip(np.arange(bs - ss, bs - ss + ds.horizon), bs, be - 1)


@pytest.fixture
def no_sanity_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataSanityWarning)
        yield


# ------------------------------------------------------------------------------------------ 1. legacy nested zarr


def _write_legacy_store(path, data, ends, separator="/"):
    """A Diffusion Policy layout store as zarr < 2.8 wrote it: format 2, chunk keys joined by ``separator``
    and no ``dimension_separator`` field in any ``.zarray``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    g = root.create_group("data")
    for k, v in data.items():
        chunks = (4,) + tuple(max(1, s // 2) for s in v.shape[1:])  # several chunks along every dim
        a = g.create_array(
            k, shape=v.shape, chunks=chunks, dtype=v.dtype, chunk_key_encoding={"name": "v2", "separator": separator}
        )
        a[:] = v
    m = root.create_group("meta")
    e = m.create_array(
        "episode_ends",
        shape=ends.shape,
        chunks=(2,),
        dtype=ends.dtype,
        chunk_key_encoding={"name": "v2", "separator": separator},
    )
    e[:] = ends
    for zarray in path.rglob(".zarray"):
        meta = json.loads(zarray.read_text())
        meta.pop("dimension_separator", None)
        zarray.write_text(json.dumps(meta))
    return path


def test_legacy_nested_zarr_reads_real_values(tmp_path, no_sanity_warnings):
    rng = np.random.default_rng(0)
    data, ends = _data(rng, (18, 11, 23), img=True)
    path = _write_legacy_store(tmp_path / "old_nested.zarr", data, ends)
    assert (path / "data" / "img" / "0" / "0" / "0" / "0").is_file()  # nested chunk keys on disk
    assert "dimension_separator" not in json.loads((path / "data" / "img" / ".zarray").read_text())
    # the fault: plain zarr 3 assumes '.', finds no chunk and returns the fill value
    assert not np.asarray(zarr.open_group(str(path), mode="r")["data"]["state"][:]).any()

    for rb in (ReplayBuffer.open(path), ReplayBuffer.copy_from_path(path)):
        np.testing.assert_array_equal(rb.episode_ends, ends)
        for k, v in data.items():
            np.testing.assert_array_equal(np.asarray(rb[k][:]), v)
    zipped = shutil.make_archive(str(tmp_path / "old_nested.zarr"), "zip", root_dir=path)
    np.testing.assert_array_equal(ReplayBuffer.copy_from_path(zipped)["img"], data["img"])

    # training windows carry the stored values (low-dim and images, in memory and read from disk)
    for in_mem in (True, False):
        ds = SequenceDataset(
            path,
            obs_keys={"obs": ["state"], "image": "img"},
            image_keys=["image"],
            horizon=8,
            n_obs_steps=2,
            n_action_steps=4,
            val_ratio=0.0,
            images_in_memory=in_mem,
        )
        for idx in (0, 9, len(ds) - 1):
            rows = _window_rows(ds, idx)
            s = ds[idx]
            np.testing.assert_array_equal(s["action"].numpy(), data["action"][rows])
            np.testing.assert_array_equal(s["obs"]["obs"].numpy(), data["state"][rows])
            # image fields hold the To = 2 observation frames of the window
            want = data["img"][rows[:2]].transpose(0, 3, 1, 2) / 255.0
            np.testing.assert_allclose(s["obs"]["image"].numpy(), want)
        assert ds.sanity_report.ok


def test_legacy_nested_zarr_append_records_separator(tmp_path):
    rng = np.random.default_rng(1)
    data, ends = _data(rng, (9, 7))
    path = _write_legacy_store(tmp_path / "old.zarr", data, ends)
    rb = ReplayBuffer.open(path, mode="r+")
    extra = {"state": rng.normal(size=(6, 5)).astype(np.float32), "action": rng.normal(size=(6, 2)).astype(np.float32)}
    rb.add_episode(extra)
    assert json.loads((path / "data" / "state" / ".zarray").read_text())["dimension_separator"] == "/"
    back = ReplayBuffer.copy_from_path(path)
    np.testing.assert_array_equal(back["state"], np.concatenate([data["state"], extra["state"]]))
    np.testing.assert_array_equal(back.episode_ends, [9, 16, 22])


def test_legacy_flat_zarr_unchanged_and_mixed_keys_rejected(tmp_path):
    rng = np.random.default_rng(2)
    data, ends = _data(rng, (10, 6))
    flat = _write_legacy_store(tmp_path / "old_flat.zarr", data, ends, separator=".")
    assert (flat / "data" / "state" / "0.0").is_file()
    np.testing.assert_array_equal(ReplayBuffer.copy_from_path(flat)["state"], data["state"])
    # a nested store later appended to with '.' keys: both layouts in one array cannot be read as one
    mixed = _write_legacy_store(tmp_path / "mixed.zarr", data, ends)
    shutil.copy(flat / "data" / "state" / "0.0", mixed / "data" / "state" / "3.0")
    with pytest.raises(ReplayBufferError, match=r"mixed\.zarr.*data/state.*nested.*flat"):
        ReplayBuffer.open(mixed)


# ------------------------------------------------------------------------------------------ 2. sanity pass


def test_check_dataset_report_stats_table_and_json(tmp_path, no_sanity_warnings):
    rng = np.random.default_rng(3)
    data, ends = _data(rng, (30, 12, 21), img=True)
    rep = check_dataset(data, ends, "demo.zarr", image_keys=["img"])
    assert isinstance(rep, SanityReport) and rep.ok and rep.n_episodes == 3 and rep.n_steps == 63
    assert (rep.episode_length_min, rep.episode_length_median, rep.episode_length_max) == (12, 21.0, 30)
    st = rep.keys["state"]
    assert st.role == "obs" and rep.keys["action"].role == "action" and rep.keys["img"].role == "image"
    np.testing.assert_allclose(
        [st.min, st.max, st.mean, st.std],
        [data["state"].min(), data["state"].max(), data["state"].mean(), data["state"].std()],
        rtol=1e-5,
    )
    assert rep.keys["img"].image_range == "0..255" and rep.keys["img"].frames_checked == 63
    text = rep.summary()
    assert "demo.zarr" in text and "median 21" in text and len(text.splitlines()) < 25
    for k in ("state", "action", "img"):
        assert k in text
    d = json.loads(json.dumps(rep.to_dict()))  # JSON-able
    assert d["ok"] and d["keys"]["state"]["shape"] == [63, 5] and d["episode_length"]["max"] == 30
    rep.save_json(tmp_path / "data_sanity.json")
    assert json.loads((tmp_path / "data_sanity.json").read_text())["source"] == "demo.zarr"


def test_check_dataset_errors_name_file_key_and_expectation():
    rng = np.random.default_rng(4)
    data, ends = _data(rng, (10, 10), img=True)
    bad = dict(data, action=np.zeros_like(data["action"]))
    with pytest.raises(DataSanityError, match=r"f\.zarr: data/action \(action\) is all zeros.*expected recorded"):
        check_dataset(bad, ends, "f.zarr", image_keys=["img"])
    with pytest.raises(DataSanityError, match=r"f\.zarr: data/state \(obs\) is all zeros"):
        check_dataset(dict(data, state=np.zeros_like(data["state"])), ends, "f.zarr")
    nan = data["state"].copy()
    nan[13, 2] = np.nan
    nan[15, 0] = np.inf
    with pytest.raises(DataSanityError, match=r"data/state.*2 non-finite.*first in frame 13.*expected finite") as e:
        check_dataset(dict(data, state=nan), ends, "f.zarr")
    assert e.value.report.keys["state"].nonfinite == 2 and isinstance(e.value, ValueError)
    # images: range against dtype
    with pytest.raises(DataSanityError, match=r"data/img \(image\).*span \[0, 510\].*expected 0\.\.255 or 0\.\.1"):
        check_dataset(dict(data, img=data["img"].astype(np.float32) * 2), ends, "f.zarr", image_keys=["img"])
    with pytest.raises(DataSanityError, match=r"data/img \(image\).*span \[-1"):
        check_dataset(dict(data, img=data["img"].astype(np.float32) / 127.5 - 1), ends, "f.zarr", image_keys=["img"])
    with pytest.raises(DataSanityError, match=r"data/img \(image\) is all zeros"):
        check_dataset(dict(data, img=np.zeros_like(data["img"])), ends, "f.zarr", image_keys=["img"])
    with pytest.raises(DataSanityError, match=r"data/img.*expected 0\.\.255$"):
        check_dataset(dict(data, img=data["img"].astype(np.int32) * 4), ends, "f.zarr", image_keys=["img"])
    ok = check_dataset(dict(data, img=data["img"].astype(np.float32) / 255), ends, "f.zarr", image_keys=["img"])
    assert ok.keys["img"].image_range == "0..1"
    # all problems in one error; raise_errors=False only reports
    rep = check_dataset(dict(bad, state=nan), ends, "f.zarr", raise_errors=False)
    assert len(rep.errors) == 2 and not rep.ok and "ERROR" in rep.summary()
    with pytest.raises(DataSanityError, match="has 19 steps but episode_ends"):
        check_dataset({"state": data["state"][:19]}, ends, "f.zarr")


def test_constant_dims_warn_not_error():
    rng = np.random.default_rng(5)
    data, ends = _data(rng, (10, 10))
    action = np.concatenate([data["action"], np.ones((20, 1), np.float32)], axis=1)  # a fixed gripper
    with pytest.warns(
        DataSanityWarning,
        match=r"g\.zarr: data/action \(action\): 1 of 3 feature dims are constant.*dims \[2\] = \[1\]",
    ):
        rep = check_dataset(dict(data, action=action), ends, "g.zarr")
    assert rep.ok and rep.keys["action"].constant_dims == [2] and rep.warnings
    with pytest.warns(DataSanityWarning, match=r"data/state \(obs\) is constant \(3\)"):
        check_dataset(dict(data, state=np.full_like(data["state"], 3.0)), ends, "g.zarr")


def test_large_images_are_subsampled_in_memory_and_on_disk(tmp_path):
    rng = np.random.default_rng(6)
    n = 5000
    img = rng.integers(0, 256, (n, 4, 4, 1)).astype(np.uint8)
    ends = np.array([2500, n])
    rep = check_dataset({"img": img}, ends, "big", image_keys=["img"], max_frames=2000)
    assert rep.keys["img"].frames_checked == 2000
    rb = ReplayBuffer.from_arrays({"img": img, "action": rng.normal(size=(n, 2))}, ends)
    path = rb.save_to_path(tmp_path / "big.zarr", chunks={"img": (100, 4, 4, 1)})
    disk = ReplayBuffer.open(path)
    rep = check_dataset({"img": disk["img"]}, ends, str(path), image_keys=["img"], max_frames=2000)
    assert 0 < rep.keys["img"].frames_checked <= 2000
    assert rep.keys["img"].min == 0 and rep.keys["img"].max == 255
    floats = img.astype(np.float32)
    floats[0, 0, 0, 0] = np.nan  # frame 0 is always among the checked frames
    with pytest.raises(DataSanityError, match="non-finite.*first in frame 0"):
        check_dataset({"img": floats}, ends, "big", image_keys=["img"])


def test_sequence_dataset_runs_the_sanity_pass(tmp_path):
    rng = np.random.default_rng(7)
    data, ends = _data(rng, (20, 20, 20), img=True)
    good = ReplayBuffer.from_arrays(data, ends).save_to_path(tmp_path / "good.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataSanityWarning)
        ds = SequenceDataset(
            good,
            obs_keys={"obs": ["state[:2]"], "image": "img"},
            image_keys=["image"],
            horizon=8,
            n_obs_steps=2,
            n_action_steps=4,
        )
    assert sorted(ds.sanity_report.keys) == ["action", "img", "state"] and ds.sanity_report.ok
    assert ds.sanity_report.keys["img"].role == "image" and "good.zarr" in ds.sanity_report.summary()
    assert ds.get_validation_dataset().sanity_report is ds.sanity_report

    zeros = ReplayBuffer.from_arrays(dict(data, action=np.zeros_like(data["action"])), ends)
    bad = zeros.save_to_path(tmp_path / "zero_actions.zarr")
    with pytest.raises(DataSanityError, match=r"zero_actions\.zarr: data/action \(action\) is all zeros"):
        SequenceDataset(bad, obs_keys=OBS_KEYS, horizon=8, n_obs_steps=2, n_action_steps=4)
    unit = ReplayBuffer.from_arrays(dict(data, img=data["img"].astype(np.float32) / 255), ends)
    unit_path = unit.save_to_path(tmp_path / "unit_img.zarr")
    with pytest.warns(DataSanityWarning, match=r"unit_img\.zarr: data/img \(image\) is a float image in 0\.\.1"):
        SequenceDataset(
            unit_path,
            obs_keys={"obs": ["state"], "image": "img"},
            image_keys=["image"],
            horizon=8,
            n_obs_steps=2,
            n_action_steps=4,
        )


# ------------------------------------------------------------------------------------------ 3. empty / malformed


def _hdf5(path, lengths, mask=None, bad_obs=()):
    """A minimal robomimic hdf5 written with h5py: data/demo_<i>/{actions (N, 14), obs/object (N, 3)}."""
    rng = np.random.default_rng(8)
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        g.attrs["env_args"] = json.dumps({"env_name": "X", "type": 1, "env_kwargs": {}})
        for i, n in enumerate(lengths):
            d = g.create_group(f"demo_{i}")
            d.attrs["num_samples"] = n
            d.create_dataset("actions", data=rng.uniform(-1, 1, (n, 14)))
            d.create_dataset("obs/object", data=rng.normal(size=(n + (1 if i in bad_obs else 0), 3)))
        if mask is not None:
            for k, names in mask.items():
                f.create_dataset(f"mask/{k}", data=np.array([s.encode() for s in names], dtype="S"))
    return path


def test_hdf5_empty_and_malformed_demos_are_skipped_with_a_warning(tmp_path):
    path = _hdf5(tmp_path / "low_dim.hdf5", [5, 0, 6, 4], bad_obs=(3,))
    with pytest.warns(DataSanityWarning) as rec:
        rb = robomimic_to_replay_buffer(path, ["object"], {"obs": ["object"]})
    msg = " ".join(str(w.message) for w in rec)
    assert (
        str(path) in msg
        and "demo_1: 0 steps" in msg
        and "demo_3" in msg
        and "data/demo_3/obs/object has 5 steps" in msg
    )
    assert rb.n_episodes == 2 and list(rb.episode_ends) == [5, 11] and rb["obs"].shape == (11, 3)
    empty = _hdf5(tmp_path / "empty.hdf5", [0, 0])
    with pytest.raises(RobomimicFormatError, match=r"empty\.hdf5: no usable demo.*demo_0: 0 steps.*demo_1: 0 steps"):
        robomimic_to_replay_buffer(empty, ["object"], {"obs": ["object"]})


def test_hdf5_filter_key_naming_missing_demos_is_a_clear_error(tmp_path):
    path = _hdf5(tmp_path / "masked.hdf5", [4, 5], mask={"train": ["demo_0", "demo_7", "demo_9"], "valid": []})
    with pytest.raises(RobomimicFormatError) as e:
        robomimic_to_replay_buffer(path, ["object"], filter_key="train")
    msg = str(e.value)
    assert (
        str(path) in msg and "mask/train" in msg and "demo_7, demo_9" in msg and "demo_0" not in msg.split("have:")[-1]
    )
    with pytest.raises(RobomimicFormatError, match=r"masked\.hdf5: mask/valid lists no demos"):
        robomimic_to_replay_buffer(path, ["object"], filter_key="valid")


def test_zarr_episodes_shorter_than_the_window(tmp_path):
    rng = np.random.default_rng(9)
    data, ends = _data(rng, (3, 5, 4))
    path = ReplayBuffer.from_arrays(data, ends).save_to_path(tmp_path / "short.zarr")
    with pytest.raises(ValueError) as e:
        SequenceDataset(path, obs_keys=OBS_KEYS, horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=0.0)
    msg = str(e.value)
    for part in (
        str(path),
        "no training windows",
        "horizon=16",
        "pad_before=1",
        "pad_after=7",
        "at least 8 steps",
        "3..5 steps",
    ):
        assert part in msg, (part, msg)
    # some episodes too short: skipped with a warning naming them
    data, ends = _data(rng, (20, 3, 12, 5))
    path = ReplayBuffer.from_arrays(data, ends).save_to_path(tmp_path / "some_short.zarr")
    with pytest.warns(
        DataSanityWarning,
        match=r"some_short\.zarr: 2 of 4 'all' episode\(s\) are shorter.*episode 1 \(3 steps\), 3 \(5 steps\)",
    ):
        ds = SequenceDataset(path, obs_keys=OBS_KEYS, horizon=16, n_obs_steps=2, n_action_steps=8, split="all")
    assert len(ds) == (20 - 16 + 1 + 7 + 1) + (12 - 16 + 1 + 7 + 1)
    with pytest.raises(ValueError, match=r"split 'train' selects 0 of 4 episodes"):
        SequenceDataset(path, obs_keys=OBS_KEYS, horizon=16, n_obs_steps=2, n_action_steps=8, max_train_episodes=0)
    # an empty episode cannot be stored in the layout: the error says which one
    bad = tmp_path / "empty_ep.zarr"
    ReplayBuffer.from_arrays(data, ends).save_to_path(bad)
    zarr.open_group(str(bad), mode="r+")["meta"]["episode_ends"][:] = [20, 20, 35, 40]
    with pytest.raises(ReplayBufferError, match=r"empty_ep\.zarr.*episode 1 would have 0 steps"):
        ReplayBuffer.open(bad)


def test_image_folder_skips_empty_files_and_names_empty_classes(tmp_path):
    root = tmp_path / "imnet"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
    rng = np.random.default_rng(10)
    for c in ("a", "c"):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / "0.png")
    (root / "a" / "broken.png").write_bytes(b"")
    with pytest.warns(DataSanityWarning) as rec:
        ds = ImageFolderDataset(root, 8, class_conditional=True, random_flip=False)
    msg = " ".join(str(w.message) for w in rec)
    assert str(root) in msg and "a/broken.png" in msg and "class folder(s) contain no images" in msg and ": b" in msg
    assert ds.classes == ["a", "b", "c"] and [lab for _, lab in ds.items] == [0, 2] and len(ds) == 2
    assert ds[1]["label"].item() == 2
    only_empty = tmp_path / "flat"
    only_empty.mkdir()
    (only_empty / "x.jpg").write_bytes(b"")
    with (
        pytest.warns(DataSanityWarning, match="x.jpg"),
        pytest.raises(ValueError, match=r"1 image file\(s\) are empty"),
    ):
        ImageFolderDataset(only_empty, 8, class_conditional=False)
