"""ReplayBuffer over real zarr 3.1 stores (formats 2 and 3), incl. the official Push-T file layout."""

import json
import os

import numcodecs
import numpy as np
import pytest
import zarr

from shortcut_policy.datasets.pusht import write_synthetic_pusht_zarr
from shortcut_policy.datasets.replay_buffer import ReplayBuffer, ReplayBufferError


def _episode(rng, n, with_img=False):
    ep = {
        "state": rng.normal(size=(n, 5)).astype(np.float32),
        "action": rng.normal(size=(n, 2)).astype(np.float32),
        "keypoint": rng.normal(size=(n, 9, 2)).astype(np.float32),
    }
    if with_img:
        ep["img"] = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    return ep


def _write_raw(path, data: dict, ends, zarr_format=2, meta=True, data_group=True):
    """Write a store directly with zarr (independent of ReplayBuffer)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    if data_group:
        g = root.create_group("data")
        for k, v in data.items():
            g.create_array(k, data=np.asarray(v))
    if meta:
        m = root.create_group("meta")
        if ends is not None:
            m.create_array("episode_ends", data=np.asarray(ends))
    return path


# ------------------------------------------------------------------------------------------------ official layout


def test_official_pusht_layout_loads_unchanged(tmp_path):
    path = tmp_path / "pusht_cchi_v7_replay.zarr"
    data, ends = write_synthetic_pusht_zarr(path, episode_lengths=(13, 9, 21, 5), seed=3, image_size=16, chunk_rows=5)
    # the file really is in the official layout: zarr v2 metadata, Blosc zstd bitshuffle, float32, odd chunks
    zimg = json.loads((path / "data" / "img" / ".zarray").read_text())
    assert zimg["zarr_format"] == 2 and zimg["dtype"] == "<f4" and zimg["compressor"]["id"] == "blosc"
    assert zimg["compressor"]["cname"] == "zstd" and zimg["compressor"]["shuffle"] == 2
    assert zimg["chunks"] != zimg["shape"]
    zends = json.loads((path / "meta" / "episode_ends" / ".zarray").read_text())
    assert zends["dtype"] == "<i8"
    assert (path / ".zgroup").exists()

    for rb in (ReplayBuffer.open(path), ReplayBuffer.copy_from_path(path)):
        assert rb.zarr_format in (2, None)
        assert sorted(rb.keys()) == ["action", "img", "keypoint", "n_contacts", "state"]
        assert rb.n_episodes == 4 and rb.n_steps == 48
        np.testing.assert_array_equal(rb.episode_ends, [13, 22, 43, 48])
        np.testing.assert_array_equal(rb.episode_lengths, [13, 9, 21, 5])
        for k, v in data.items():
            np.testing.assert_array_equal(np.asarray(rb[k][:]), v)
            assert rb[k].dtype == np.float32
        assert rb["img"].shape == (48, 16, 16, 3)
        ep = rb.get_episode(2)
        np.testing.assert_array_equal(ep["keypoint"], data["keypoint"][22:43])
        assert rb.get_episode_slice(-1) == slice(43, 48)
    assert ReplayBuffer.open(path).backend == "zarr"
    assert ReplayBuffer.copy_from_path(path).backend == "numpy"


def test_copy_from_path_selected_keys(tmp_path):
    path = tmp_path / "p.zarr"
    data, _ = write_synthetic_pusht_zarr(path, episode_lengths=(4, 6), with_images=False)
    rb = ReplayBuffer.copy_from_path(path, keys=["state", "action"])
    assert rb.keys() == ["state", "action"]
    with pytest.raises(KeyError, match=r"img.*p\.zarr|p\.zarr.*img"):
        ReplayBuffer.copy_from_path(path, keys=["state", "img"])
    with pytest.raises(KeyError, match="'nope'"):
        rb["nope"]


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_numpy_buffer_save_and_reload(tmp_path, zarr_format):
    rng = np.random.default_rng(0)
    rb = ReplayBuffer.create_empty_numpy()
    eps = [_episode(rng, n, with_img=True) for n in (3, 50, 1, 17)]
    for ep in eps:
        rb.add_episode(ep)
    assert rb.n_episodes == 4 and rb.n_steps == 71
    out = tmp_path / f"buf_v{zarr_format}.zarr"
    rb.save_to_path(out, zarr_format=zarr_format)
    assert [p for p in os.listdir(tmp_path) if p != out.name] == []  # no temp dirs left behind
    if zarr_format == 2:
        meta = json.loads((out / "data" / "state" / ".zarray").read_text())
        assert meta["compressor"] == {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 2, "blocksize": 0}
    else:
        meta = json.loads((out / "data" / "state" / "zarr.json").read_text())
        blosc = [c for c in meta["codecs"] if c["name"] == "blosc"][0]["configuration"]
        assert blosc["cname"] == "zstd" and blosc["clevel"] == 5 and blosc["shuffle"] == "bitshuffle"
    back = ReplayBuffer.copy_from_path(out)
    np.testing.assert_array_equal(back.episode_ends, [3, 53, 54, 71])
    for i, ep in enumerate(eps):
        got = back.get_episode(i)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
            assert got[k].dtype == ep[k].dtype


def test_save_refuses_existing_path_and_overwrites_atomically(tmp_path):
    rng = np.random.default_rng(1)
    rb = ReplayBuffer.create_empty_numpy()
    rb.add_episode(_episode(rng, 5))
    out = tmp_path / "x.zarr"
    rb.save_to_path(out)
    before = ReplayBuffer.copy_from_path(out)["state"].copy()
    rb2 = ReplayBuffer.create_empty_numpy()
    rb2.add_episode(_episode(rng, 7))
    with pytest.raises(FileExistsError, match="x.zarr"):
        rb2.save_to_path(out)
    np.testing.assert_array_equal(ReplayBuffer.copy_from_path(out)["state"], before)  # untouched
    rb2.save_to_path(out, overwrite=True)
    assert ReplayBuffer.copy_from_path(out).n_steps == 7
    assert sorted(os.listdir(tmp_path)) == ["x.zarr"]


def test_on_disk_buffer_append_and_reopen(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "disk.zarr"
    rb = ReplayBuffer.create_empty_zarr(path, zarr_format=2)
    assert rb.n_episodes == 0 and rb.n_steps == 0 and rb.keys() == []
    e1, e2 = _episode(rng, 11), _episode(rng, 4)
    rb.add_episode(e1, compressors="disk")
    rb.add_episode(e2)
    with pytest.raises(FileExistsError):
        ReplayBuffer.create_empty_zarr(path)
    ro = ReplayBuffer.open(path, mode="r")
    np.testing.assert_array_equal(ro.episode_ends, [11, 15])
    np.testing.assert_array_equal(ro["keypoint"][11:15], e2["keypoint"])
    assert ro["state"].compressors[0].cname == "zstd"
    with pytest.raises(ReplayBufferError, match="read-only"):
        ro.add_episode(e1)
    rw = ReplayBuffer.open(path, mode="r+")
    rw.add_episode(e1)
    again = ReplayBuffer.copy_from_path(path)
    np.testing.assert_array_equal(again.episode_ends, [11, 15, 26])
    np.testing.assert_array_equal(again.get_episode(2)["action"], e1["action"])
    # empty on-disk buffers open too
    ReplayBuffer.create_empty_zarr(tmp_path / "empty.zarr", zarr_format=3)
    assert ReplayBuffer.open(tmp_path / "empty.zarr").n_episodes == 0


def test_numpy_buffer_growth_keeps_data(tmp_path):
    rng = np.random.default_rng(3)
    rb = ReplayBuffer.create_empty_numpy()
    eps = [_episode(rng, int(n)) for n in rng.integers(1, 40, 60)]
    for ep in eps:
        rb.add_episode(ep)
    allstate = np.concatenate([e["state"] for e in eps])
    np.testing.assert_array_equal(rb["state"], allstate)
    assert rb["state"].shape[0] == rb.n_steps == len(allstate)
    np.testing.assert_array_equal(rb.get_episode(-1)["action"], eps[-1]["action"])
    with pytest.raises(IndexError, match="60"):
        rb.get_episode(60)
    with pytest.raises(ValueError):
        rb.episode_ends[0] = 5  # read-only view


def test_add_episode_validation():
    rng = np.random.default_rng(4)
    rb = ReplayBuffer.create_empty_numpy()
    bad = _episode(rng, 5)
    bad["action"] = bad["action"][:4]
    with pytest.raises(ReplayBufferError, match="different lengths"):
        rb.add_episode(bad)
    rb.add_episode(_episode(rng, 5))
    ep = _episode(rng, 3)
    del ep["keypoint"]
    with pytest.raises(ReplayBufferError, match="keys"):
        rb.add_episode(ep)
    ep = _episode(rng, 3)
    ep["state"] = ep["state"][:, :4]
    with pytest.raises(ReplayBufferError, match="'state'.*shape"):
        rb.add_episode(ep)
    with pytest.raises(ReplayBufferError, match="length 0"):
        rb.add_episode({k: v[:0] for k, v in _episode(rng, 2).items()})
    assert rb.n_episodes == 1


# ------------------------------------------------------------------------------------------------ validation on load


def test_layout_errors_name_file_and_key(tmp_path):
    good = {"state": np.zeros((10, 5), np.float32), "action": np.zeros((10, 2), np.float32)}
    p = _write_raw(tmp_path / "nodata.zarr", good, [4, 10], data_group=False)
    with pytest.raises(ReplayBufferError, match=r"nodata\.zarr.*data/"):
        ReplayBuffer.open(p)
    p = _write_raw(tmp_path / "nometa.zarr", good, None)
    with pytest.raises(ReplayBufferError, match=r"nometa\.zarr.*meta/episode_ends"):
        ReplayBuffer.copy_from_path(p)
    p = _write_raw(tmp_path / "noinc.zarr", good, [4, 4, 10])
    with pytest.raises(ReplayBufferError, match=r"noinc\.zarr.*strictly increasing.*episode_ends\[1\]=4"):
        ReplayBuffer.open(p)
    p = _write_raw(tmp_path / "float.zarr", good, np.array([4.0, 10.0]))
    with pytest.raises(ReplayBufferError, match=r"float\.zarr.*integer"):
        ReplayBuffer.copy_from_path(p)
    p = _write_raw(tmp_path / "past.zarr", good, [4, 12])
    with pytest.raises(ReplayBufferError, match=r"past\.zarr.*episode_ends\[-1\]=12.*past.*data/"):
        ReplayBuffer.open(p)
    p = _write_raw(tmp_path / "short.zarr", good, [4, 8])
    with pytest.raises(ReplayBufferError, match=r"short\.zarr.*10 rows.*episode_ends\[-1\]=8"):
        ReplayBuffer.open(p)
    uneven = dict(good, action=np.zeros((9, 2), np.float32))
    p = _write_raw(tmp_path / "uneven.zarr", uneven, [4, 10])
    with pytest.raises(ReplayBufferError, match=r"uneven\.zarr.*different lengths.*data/action: 9"):
        ReplayBuffer.copy_from_path(p)
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        ReplayBuffer.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="episode_ends"):
        ReplayBuffer.from_arrays(good, [3, 2])


def test_v3_store_written_by_zarr_directly(tmp_path):
    rng = np.random.default_rng(5)
    data = {"object": rng.normal(size=(9, 41)), "action": rng.normal(size=(9, 14))}
    p = _write_raw(tmp_path / "v3.zarr", data, np.array([2, 9], np.int32), zarr_format=3)
    rb = ReplayBuffer.open(p)
    assert rb.zarr_format == 3 and rb.n_episodes == 2 and rb.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(rb.get_episode(1)["object"], data["object"][2:])
    assert isinstance(numcodecs.Blosc(), numcodecs.abc.Codec)  # numcodecs present for format-2 codecs


def test_zip_store_reads(tmp_path):
    import shutil

    src = tmp_path / "d.zarr"
    data, _ = write_synthetic_pusht_zarr(src, episode_lengths=(6, 3), with_images=False)
    zipped = shutil.make_archive(str(tmp_path / "d.zarr"), "zip", root_dir=src)  # -> d.zarr.zip
    rb = ReplayBuffer.copy_from_path(zipped)
    np.testing.assert_array_equal(rb["state"], data["state"])
    assert ReplayBuffer.open(zipped).n_episodes == 2
    with pytest.raises(ReplayBufferError, match="read-only"):
        ReplayBuffer.open(zipped, mode="r+")


def test_merge_replay_buffers_script(tmp_path):
    """scripts/merge_replay_buffers.py: episodes of both inputs in order; mismatched keys refused; no overwrite."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "merge_replay_buffers.py"
    a = ReplayBuffer.from_arrays({"x": np.arange(5.0)[:, None], "action": np.ones((5, 2))}, [2, 5])
    b = ReplayBuffer.from_arrays({"x": -np.arange(4.0)[:, None], "action": np.zeros((4, 2))}, [4])
    c = ReplayBuffer.from_arrays({"y": np.zeros((3, 1))}, [3])
    for name, rb in (("a", a), ("b", b), ("c", c)):
        rb.save_to_path(tmp_path / f"{name}.zarr")
    out = tmp_path / "ab.zarr"
    run = [sys.executable, str(script), str(out), str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    subprocess.run(run, check=True, capture_output=True)
    m = ReplayBuffer.copy_from_path(out)
    assert m.n_episodes == 3 and list(m.episode_ends) == [2, 5, 9]
    np.testing.assert_array_equal(m["x"][:, 0], [0, 1, 2, 3, 4, 0, -1, -2, -3])
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and "overwrite" in again.stderr
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ac.zarr"), str(tmp_path / "a.zarr"), str(tmp_path / "c.zarr")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "c.zarr" in bad.stderr and "keys" in bad.stderr
    assert not (tmp_path / "ac.zarr").exists()
