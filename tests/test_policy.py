"""Policy: training through the CLI on real zarr files, checkpoints, resume, predict_action, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny import tiny_train

from shortcut_policy import cli
from shortcut_policy.datasets.pusht import write_synthetic_pusht_zarr
from shortcut_policy.policy import load_policy

TINY = [
    *tiny_train(batch_size=8, warmup_steps=1),
]


@pytest.fixture(scope="module")
def zarr_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "pusht.zarr"
    write_synthetic_pusht_zarr(p, episode_lengths=(30, 25, 41, 33), with_images=True)
    return p


@pytest.fixture(scope="module")
def lowdim_ckpt(zarr_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    res = cli.run_verb(
        "train",
        ["task=pusht_lowdim", f"task.dataset.zarr_path={zarr_path}", *TINY, "train.num_steps=3", f"run_dir={run}"],
    )
    assert res["steps"] == 3
    return run / "checkpoints" / "last.ckpt"


def test_checkpoint_has_config_normalizer_and_ema(lowdim_ckpt):
    ck = torch.load(lowdim_ckpt, weights_only=False)
    assert ck["cfg"]["task"]["name"] == "pusht_lowdim" and ck["step"] == 3
    assert any(k.startswith("normalizer.params_dict.action") for k in ck["ema"]["model"])
    assert (lowdim_ckpt.parent.parent / "config.yaml").exists()


@pytest.mark.parametrize("steps", [1, 4, 128])
def test_predict_action_shapes_and_range(lowdim_ckpt, steps):
    policy = load_policy(lowdim_ckpt)
    obs = {"obs": np.random.default_rng(0).uniform(0, 512, (3, 2, 20)).astype(np.float32)}
    act = policy.predict_action(obs, steps=steps)
    assert act.shape == (3, 8, 2) and np.isfinite(act).all()
    lo, hi = [policy.normalizer["action"].get_input_stats()[k].numpy() for k in ("min", "max")]
    assert (act >= lo - 1e-3).all() and (act <= hi + 1e-3).all()  # clamped to the normalised range


def test_predict_action_rejects_bad_input(lowdim_ckpt):
    policy = load_policy(lowdim_ckpt)
    good = np.zeros((1, 2, 20), np.float32)
    with pytest.raises(ValueError, match="power of two"):
        policy.predict_action({"obs": good}, steps=3)
    with pytest.raises(KeyError, match="missing"):
        policy.predict_action({"image": good}, steps=1)
    with pytest.raises(ValueError, match=r"expected \(B, T>=2, 20\)"):
        policy.predict_action({"obs": np.zeros((1, 2, 19), np.float32)}, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action({"obs": np.full((1, 2, 20), np.nan, np.float32)}, steps=1)
    with pytest.raises(ValueError, match="trained on task 'pusht_lowdim', not 'pusht_image'"):
        load_policy(lowdim_ckpt, expect_task="pusht_image")


def test_compute_loss_rejects_bad_batches(lowdim_ckpt):
    policy = load_policy(lowdim_ckpt, weights="online").train()
    batch = {"obs": {"obs": torch.rand(4, 16, 20) * 500}, "action": torch.rand(4, 16, 2) * 500}
    loss, info = policy.compute_loss(batch)
    assert torch.isfinite(loss) and "loss_bootstrap" in info
    with pytest.raises(ValueError, match=r"action has shape \(4, 16, 3\)"):
        policy.compute_loss({**batch, "action": torch.rand(4, 16, 3)})
    bad = batch["action"].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy.compute_loss({**batch, "action": bad})


@pytest.mark.parametrize("objective", ["flow_matching", "diffusion"])
def test_other_objectives_train_and_sample(zarr_path, tmp_path, objective):
    cli.run_verb(
        "train",
        [
            "task=pusht_lowdim",
            f"task.dataset.zarr_path={zarr_path}",
            *TINY,
            f"objective={objective}",
            "train.num_steps=2",
            f"run_dir={tmp_path}",
        ],
    )
    policy = load_policy(tmp_path / "checkpoints" / "last.ckpt")
    steps = 10 if objective == "diffusion" else 4
    kw = {"sampler": "ddim"} if objective == "diffusion" else {}
    assert policy.predict_action({"obs": np.zeros((2, 2, 20), np.float32)}, steps=steps, **kw).shape == (2, 8, 2)


def test_image_policy_trains_and_predicts(zarr_path, tmp_path):
    cli.run_verb(
        "train",
        [
            "task=pusht_image",
            f"task.dataset.zarr_path={zarr_path}",
            *TINY,
            "task.encoder.resnet_width=16",
            "train.batch_size=4",
            "train.num_steps=2",
            f"run_dir={tmp_path}",
        ],
    )
    policy = load_policy(tmp_path / "checkpoints" / "last.ckpt")
    obs = {
        "image": np.random.rand(2, 2, 3, 96, 96).astype(np.float32),
        "agent_pos": np.full((2, 2, 2), 200.0, np.float32),
    }
    assert policy.predict_action(obs, steps=2).shape == (2, 8, 2)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shortcut-policy demos"):
        cli.run_verb(
            "train",
            ["task=pusht_lowdim", f"task.dataset.zarr_path={tmp_path}/nope.zarr", *TINY, f"run_dir={tmp_path}/run"],
        )


def test_init_weights_starts_from_another_runs_weights(lowdim_ckpt, zarr_path, tmp_path):
    src = torch.load(lowdim_ckpt, weights_only=False)
    run = tmp_path / "ft"
    res = cli.run_verb(
        "train",
        [
            "task=pusht_lowdim",
            f"task.dataset.zarr_path={zarr_path}",
            *TINY,
            "train.num_steps=1",
            "train.lr=1e-12",
            f"train.init_weights={lowdim_ckpt}",
            f"run_dir={run}",
        ],
    )
    assert res["steps"] == 1  # a fresh step count and schedule
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    # one step at a negligible learning rate: the weights are (to rounding) the source run's, not a new init
    for k, v in src["model"].items():
        if v.is_floating_point():
            assert torch.allclose(ck["model"][k], v, atol=1e-6), k
    assert ck["ema"]["step"] == src["ema"]["step"] + 1
    with pytest.raises(ValueError, match="do not fit this run's network"):
        cli.run_verb(
            "train",
            [
                "task=pusht_lowdim",
                f"task.dataset.zarr_path={zarr_path}",
                *TINY,
                "net.down_dims=[8,16]",
                "train.num_steps=1",
                f"train.init_weights={lowdim_ckpt}",
                f"run_dir={tmp_path}/bad",
            ],
        )
    with pytest.raises(FileNotFoundError, match="init_weights"):
        cli.run_verb(
            "train",
            [
                "task=pusht_lowdim",
                f"task.dataset.zarr_path={zarr_path}",
                *TINY,
                "train.num_steps=1",
                f"train.init_weights={tmp_path}/none.ckpt",
                f"run_dir={tmp_path}/bad2",
            ],
        )


def test_init_normalizer_data_keeps_this_runs_fit(lowdim_ckpt, zarr_path, tmp_path):
    """init_normalizer=data: weights from the checkpoint, normaliser refit to this run's data (here the checkpoint's
    normaliser was altered, so the two choices give different, known results)."""
    src = torch.load(lowdim_ckpt, weights_only=False)
    norm_keys = [k for k in src["model"] if k.startswith("normalizer.") and k.endswith(".scale")]
    assert norm_keys
    for sd in (src["model"], src["ema"]["model"]):
        for k in norm_keys:
            sd[k] = sd[k] * 2.0
    altered = tmp_path / "altered.ckpt"
    torch.save(src, altered)
    base = [
        "task=pusht_lowdim",
        f"task.dataset.zarr_path={zarr_path}",
        *TINY,
        "train.num_steps=1",
        "train.lr=1e-12",
        f"train.init_weights={altered}",
    ]
    for mode, factor in (("checkpoint", 2.0), ("data", 1.0)):
        run = tmp_path / mode
        cli.run_verb("train", base + [f"train.init_normalizer={mode}", f"run_dir={run}"])
        ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        for k in norm_keys:
            want = src["model"][k] / 2.0 * factor
            assert torch.allclose(ck["model"][k], want) and torch.allclose(ck["ema"]["model"][k], want), (mode, k)
    with pytest.raises(ValueError, match="init_normalizer"):
        cli.run_verb("train", base + ["train.init_normalizer=both", f"run_dir={tmp_path}/bad"])


def test_killed_training_resumes_from_last_checkpoint(zarr_path, tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "shortcut_policy.cli",
        "train",
        "task=pusht_lowdim",
        f"task.dataset.zarr_path={zarr_path}",
        *TINY,
        "train.checkpoint_every=2",
        f"run_dir={run}",
    ]
    proc = subprocess.Popen(
        args + ["train.num_steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    done = torch.load(last, weights_only=False)["step"]
    assert done >= 2
    out = subprocess.run(args + [f"train.num_steps={done + 2}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {last} at step {done}" in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1][len("RESULT ") :])
    assert result["steps"] == done + 2


def test_rollout_evaluation_during_training_on_chosen_seeds(zarr_path, tmp_path):
    """train.eval_seed_start / eval_episodes: rollouts during training on seeds disjoint from the test seeds select
    the top-k checkpoints, with the deployed execution horizon and warm start; the logged metrics say which seeds
    and which setting were used."""
    res = cli.run_verb(
        "train",
        [
            "task=pusht_lowdim",
            f"task.dataset.zarr_path={zarr_path}",
            *TINY,
            "train.num_steps=2",
            "train.eval_every=2",
            "train.eval_episodes=1",
            "train.eval_seed_start=200000",
            "train.eval_n_action_steps=4",  # the deployed setting chooses the checkpoint
            "train.eval_warm_start=0.5",
            "task.max_steps=16",
            "task.eval.n_workers=1",
            "task.eval.n_videos=0",
            f"run_dir={tmp_path}",
        ],
    )
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    evals = [r for r in logs if "eval/test_mean_score" in r]
    assert len(evals) == 1 and evals[0]["eval/seed_start"] == 200000 and evals[0]["eval/n_episodes"] == 1
    assert evals[0]["eval/warm_start"] == 0.5 and evals[0]["eval/n_action_steps"] == 4
    assert not any(k.startswith("eval/stage/") for k in evals[0])  # Push-T reports no task stages
    topk = json.loads((tmp_path / "checkpoints" / "topk.json").read_text())
    assert topk[0]["step"] == 2 and (tmp_path / "checkpoints" / topk[0]["path"]).is_file()
    assert res["best_test_mean_score"] == pytest.approx(evals[0]["eval/test_mean_score"])
    # the top-k file is usable as a command-line override (no '=' in its name): fine-tune from it through the CLI
    best = tmp_path / "checkpoints" / topk[0]["path"]
    res2 = cli.run_verb(
        "train",
        [
            "task=pusht_lowdim",
            f"task.dataset.zarr_path={zarr_path}",
            *TINY,
            "train.num_steps=1",
            f"train.init_weights={best}",
            f"run_dir={tmp_path / 'ft'}",
        ],
    )
    assert res2["steps"] == 1
