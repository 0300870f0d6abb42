"""shortcut_policy.utils: atomic writes, the integer check, device and worker helpers."""

import os

import pytest

from shortcut_policy.utils import (
    TEMP_NAME_RE,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_int,
    default_workers,
    resolve_device,
    temp_path,
)


def test_atomic_write_text_and_bytes(tmp_path):
    p = tmp_path / "sub" / "a.json"
    assert atomic_write_text(p, "{}") == p
    assert p.read_text() == "{}"
    atomic_write_bytes(p, b"xyz")
    assert p.read_bytes() == b"xyz"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_atomic_path_removes_the_temp_file_and_keeps_the_target_on_error(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text("old")
    with pytest.raises(KeyError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise KeyError("boom")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_path_replaces_a_directory(tmp_path):
    p = tmp_path / "store.zarr"
    for name in ("first", "second"):
        with atomic_path(p) as tmp:
            tmp.mkdir()
            (tmp / name).write_text(name)
    assert sorted(x.name for x in p.iterdir()) == ["second"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store.zarr"]


def test_atomic_path_without_output_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x.txt"):
            pass


@pytest.mark.parametrize("keep_suffix", [False, True])
def test_temp_names_match_the_stale_file_pattern(tmp_path, keep_suffix):
    t = temp_path(tmp_path / "fig.png", keep_suffix=keep_suffix)
    m = TEMP_NAME_RE.match(t.name)
    assert m and int(m["pid"]) == os.getpid()
    assert t.suffix == (".png" if keep_suffix else f".tmp{os.getpid()}")


def test_check_int():
    assert check_int("x", 1e5) == 100000
    assert check_int("x", "8", 1) == 8
    with pytest.raises(ValueError, match="x='8'"):
        check_int("x", "8", strings=False)
    with pytest.raises(ValueError, match=r"seed=-1: expected an integer in \[0, 9\]"):
        check_int("seed", -1, 0, 9)
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        check_int("n", 0, 1)
    for bad in (True, None, 1.5, "a"):
        with pytest.raises(ValueError):
            check_int("x", bad)


def test_device_and_workers():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert default_workers(1) == 1
    assert default_workers() >= 1
