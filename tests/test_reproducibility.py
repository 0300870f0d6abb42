"""Every run is reproducible from its seed, and a resumed run equals an uninterrupted one (CPU, bit for bit).

Trains the tiny Push-T low-dim policy through the real CLI on a real zarr file: same seed -> identical weights,
different seed -> different weights; a run killed with SIGKILL at a random step and resumed by re-running the same
command ends with the same weights and the same logged losses as an uninterrupted run; a resume that changes the
learning rate / number of steps takes effect, and one that changes the network is refused before anything is
written.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import tiny_train

from shortcut_policy import cli

TINY = [
    "task=pusht_lowdim",
    *tiny_train(batch_size=8, warmup_steps=2),
    "train.threads=1",
    "train.deterministic=true",
]


@pytest.fixture(scope="module")
def zarr_path(pusht_lowdim_zarr):
    return pusht_lowdim_zarr


def _train(zarr_path, run_dir, *extra):
    return cli.run_verb("train", [*TINY, f"task.dataset.zarr_path={zarr_path}", f"run_dir={run_dir}", *extra])


def _weights(run_dir, which="model"):
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ck[which] if which == "model" else ck["ema"]["model"]


def _losses(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "logs.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_identical_weights_different_seed_different(zarr_path, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _train(zarr_path, tmp_path / name, "train.num_steps=6", f"train.seed={seed}")
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert _same(a, b), "same command and seed in two run_dirs gave different weights"
    assert _same(_weights(tmp_path / "a", "ema"), _weights(tmp_path / "b", "ema"))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert not _same(a, c), "a different seed must give different weights"


def test_kill9_and_resume_equals_uninterrupted(zarr_path, tmp_path):
    n = 40
    args = [f"train.num_steps={n}", "train.checkpoint_every=4", "train.seed=11"]
    _train(zarr_path, tmp_path / "ref", *args)
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "shortcut_policy.cli",
        "train",
        *TINY,
        f"task.dataset.zarr_path={zarr_path}",
        f"run_dir={run}",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_at = random.Random(os.getpid()).randint(6, n - 6)  # a random step, past the first checkpoint
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "logs.jsonl").exists() and any(s >= kill_at for s, _ in _losses(run)):
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed (kill point too late)"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert _same(_weights(tmp_path / "ref"), _weights(run))
    assert _same(_weights(tmp_path / "ref", "ema"), _weights(run, "ema"))
    assert _losses(run) == _losses(tmp_path / "ref"), "logged losses differ from the uninterrupted run"


def test_resume_applies_changed_lr_and_steps_and_refuses_a_different_net(zarr_path, tmp_path):
    run = tmp_path / "run"
    _train(zarr_path, run, "train.num_steps=5", "train.lr=1e-3", "train.lr_schedule=constant")
    res = _train(zarr_path, run, "train.num_steps=8", "train.lr=1e-4", "train.lr_schedule=constant")
    assert res["steps"] == 8
    rows = [json.loads(ln) for ln in (run / "logs.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[5] == pytest.approx(1e-3) and lrs[6] == pytest.approx(1e-4) and lrs[8] == pytest.approx(1e-4)
    changes = [json.loads(r["resume_changes"]) for r in rows if "resume_changes" in r]
    assert changes and changes[-1]["train.lr"] == [1e-3, 1e-4]
    assert "lr: 0.0001" in (run / "config.yaml").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ValueError, match=r"net\.down_dims"):
        _train(zarr_path, run, "train.num_steps=10", "net.down_dims=[16,64]")
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert before == after, "a refused resume wrote into the run directory"


def test_cpu_bf16_autocast_is_opt_in_and_trains(zarr_path, tmp_path):
    """train.amp=bf16 on CPU runs the loss under bf16 autocast (weights stay fp32) and is reproducible from its seed;
    the default (auto) keeps CPU training in fp32, so its weights differ from the bf16 run's."""
    for name, amp in (("a", "bf16"), ("b", "bf16"), ("c", "auto")):
        _train(zarr_path, tmp_path / name, "train.num_steps=4", f"train.amp={amp}", "objective=shortcut_m16")
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())
    assert _same(a, b)
    assert not _same(a, c), "bf16 autocast had no effect on CPU"
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in _losses(tmp_path / "a"))
