"""End to end on a tiny generated ImageNet-style folder with a tiny saved AutoencoderKL:
`latents` -> `train task=imagenet256` -> `sample` and `fid` on its checkpoint.

The default test overrides the net to dit_tiny (DiT-B/2's 130M parameters cost several GB of optimiser + EMA state
and a 2 GB checkpoint per save on CPU); ``test_train_imagenet256_dit_b2`` (slow) runs DiT-B/2 itself for 2 steps.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shortcut_policy.cli import run_verb


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("imgtrain")
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            base = np.zeros((36, 40, 3), np.uint8) + (
                np.array([200, 40, 40]) if c == "n01" else np.array([40, 40, 200])
            )
            img = (base + rng.integers(0, 40, (36, 40, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "imgs" / c / f"{i}.jpg")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(str(root / "vae"))
    task = [
        f"task.data_dir={root / 'imgs'}",
        f"task.vae_path={root / 'vae'}",
        f"task.latents_path={root / 'lat.zarr'}",
        "task.image_size=32",
        "task.latent_downsample=2",
        "task.num_classes=2",
    ]
    res = run_verb("latents", ["task=imagenet256", *task, "shard_size=4", "device=cpu", f"run_dir={root / 'lat_run'}"])
    assert res["count"] == 8 and res["shape"] == [4, 16, 16]
    return root, task


def _train(root, task, net, run, steps=2, extra=()):
    return run_verb(
        "train",
        [
            "task=imagenet256",
            f"net={net}",
            *task,
            f"train.num_steps={steps}",
            "train.batch_size=4",
            "train.device=cpu",
            "train.checkpoint_every=1000",
            "logger=none",
            f"run_dir={root / run}",
            *extra,
        ],
    )


def test_train_sample_fid_imagenet256(assets):
    root, task = assets
    res = _train(root, task, "dit_tiny", "train_tiny", steps=3)
    assert res["steps"] == 3 and np.isfinite(res["train_loss"])
    ckpt = root / "train_tiny" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    cfg = json.loads(json.dumps(torch.load(ckpt, weights_only=False)["cfg"]))
    assert cfg["objective"]["bootstrap_cfg"] is True and cfg["objective"]["cfg_scale"] == 1.5
    # resume continues from the checkpoint
    assert _train(root, task, "dit_tiny", "train_tiny", steps=4)["steps"] == 4

    s = run_verb(
        "sample",
        [f"checkpoint={ckpt}", "num_images=4", "nrow=2", "steps=[1,4,128]", "device=cpu", f"run_dir={root / 'sample'}"],
    )
    grids = {k: np.asarray(Image.open(v)) for k, v in s["grids"].items()}
    assert set(grids) == {"1steps", "4steps", "128steps"}
    assert grids["1steps"].shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 2x2 grid of decoded 32px images
    assert not np.array_equal(grids["1steps"], grids["128steps"])
    assert s["nfe@128steps"] == 128

    f = run_verb(
        "fid",
        [
            f"checkpoint={ckpt}",
            f"ref_dir={root / 'imgs'}",
            f"ref_stats={root / 'ref.npz'}",
            "num_samples=4",
            "steps=[1,4]",
            "device=cpu",
            f"run_dir={root / 'fid'}",
        ],
    )
    assert f["fid@1"] > 0 and f["fid@4"] > 0 and f["n_ref"] == 8 and (root / "ref.npz").is_file()
    with pytest.raises(ValueError, match="resolution"):
        run_verb(
            "fid",
            [
                f"checkpoint={ckpt}",
                f"ref_stats={root / 'ref.npz'}",
                "resolution=64",
                "num_samples=4",
                "steps=[1]",
                "device=cpu",
                f"run_dir={root / 'fid2'}",
            ],
        )


def test_online_encoding_and_store_checks(assets):
    root, task = assets
    # latents_path=null: the VAE encodes (and samples) every batch, as the reference does
    res = _train(root, task, "dit_tiny", "train_online", steps=1, extra=["task.latents_path=null"])
    assert res["steps"] == 1
    with pytest.raises(FileNotFoundError, match="shortcut-policy latents"):
        _train(root, task, "dit_tiny", "train_missing", steps=1, extra=[f"task.latents_path={root / 'none.zarr'}"])
    with pytest.raises(ValueError, match="expects latent"):
        _train(root, task, "dit_tiny", "train_bad", steps=1, extra=["task.latent_downsample=4"])


def test_unconditional_labels_are_null():
    from shortcut_policy.cli import compose
    from shortcut_policy.generator import build_generator

    cfg = compose(
        "train", ["task=celebahq256", "net=dit_tiny", "task.space=pixel", "task.image_size=8", "task.image_channels=3"]
    )
    gen = build_generator(cfg)
    assert gen.net.y_embedder.num_embeddings == 2
    assert torch.equal(gen.labels_for(torch.tensor([0, 0, 1])), torch.tensor([1, 1, 1]))
    x = gen.sample(torch.zeros(2, dtype=torch.long), steps=2, noise=torch.randn(2, 3, 8, 8))
    assert x.shape == (2, 3, 8, 8) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="power of two"):
        gen.sample(torch.zeros(2, dtype=torch.long), steps=3)


@pytest.mark.slow
def test_train_imagenet256_dit_b2(assets):
    root, task = assets
    res = _train(root, task, "dit_b2", "train_b2", steps=2)
    assert res["steps"] == 2 and np.isfinite(res["train_loss"])
    s = run_verb(
        "sample",
        [
            f"checkpoint={root / 'train_b2' / 'checkpoints' / 'last.ckpt'}",
            "num_images=2",
            "steps=[1,4]",
            "device=cpu",
            f"run_dir={root / 'sample_b2'}",
        ],
    )
    assert set(s["grids"]) == {"1steps", "4steps"}


def test_bench_images_smoke(tmp_path):
    """`bench images` end to end at a toy budget: RESULT keys, grid, classifier cache, re-evaluation."""
    from omegaconf import OmegaConf

    from shortcut_policy.bench.images import run_bench_images

    over = {
        "num_steps": 2,
        "batch_size": 16,
        "n_eval": 20,
        "steps": [1, 2],
        "parallel": False,
        "classifier_epochs": 1,
        "classifier_cache": str(tmp_path / "clf_{size}px.pt"),
        "net": {"hidden_size": 16, "depth": 1, "num_heads": 2},
    }
    res = run_bench_images(OmegaConf.create({"images": over}), tmp_path / "run")
    for obj in ("shortcut", "flow_matching"):
        for n in (1, 2):
            assert np.isfinite(res[f"fid@{obj}{n}"]) and 0.0 <= res[f"acc@{obj}{n}"] <= 1.0
    assert "targets" not in res  # the targets need N = 128, not evaluated at this budget
    assert (tmp_path / "clf_16px.pt").is_file() and (tmp_path / "run" / "samples_grid.png").is_file()
    assert res["fid_vs_nfe"] == str(tmp_path / "run" / "fid_vs_nfe.png") and Path(res["fid_vs_nfe"]).stat().st_size > 0
    assert (tmp_path / "run" / "shortcut" / "checkpoints" / "last.ckpt").is_file()
    # same run_dir: training is complete, so only the evaluation runs again (same figures)
    again = run_bench_images(OmegaConf.create({"images": over}), tmp_path / "run")
    assert again["fid@shortcut1"] == pytest.approx(res["fid@shortcut1"])
