"""Image folders, digits, and the latent / pixel zarr stores (with a tiny randomly initialised AutoencoderKL)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from shortcut_policy.datasets.images import DigitsDataset, ImageFolderDataset, center_crop_resize, make_grid
from shortcut_policy.datasets.latents import LatentDataset, decode, encode, encode_dataset, load_vae


def make_folder(root, classes=None, n=3, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in classes or [None]:
        d = root / c if c else root
        d.mkdir(exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(str(path))
    return path


def test_center_crop_resize_and_range(tmp_path):
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 15, 30))  # left quarter blue: cropped away by the centre crop
    out = center_crop_resize(img, 16)
    assert out.size == (16, 16)
    a = np.asarray(out)
    assert (a[..., 0] > 250).all() and (a[..., 2] < 5).all()


def test_image_folder_conditional_and_unconditional(tmp_path):
    root = make_folder(tmp_path / "imnet", classes=["n02", "n01"], n=2)
    ds = ImageFolderDataset(root, 16, class_conditional=True)
    assert ds.classes == ["n01", "n02"] and len(ds) == 4 and ds.num_classes == 2
    item = ds[3]
    assert item["x"].shape == (3, 16, 16) and item["label"].item() == 1 and item["label"].dtype == torch.long
    assert item["x"].min() >= -1 and item["x"].max() <= 1
    # flip is exactly a horizontal mirror
    torch.testing.assert_close(ds.load(0, flip=True), ds.load(0).flip(-1))
    flat = ImageFolderDataset(make_folder(tmp_path / "celeba", n=3), 16, class_conditional=False)
    assert len(flat) == 3 and flat.num_classes == 1 and flat[0]["label"].item() == 0


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataset(tmp_path / "nope", 16, class_conditional=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        ImageFolderDataset(tmp_path / "empty", 16, class_conditional=False)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(make_folder(tmp_path / "flat"), 16, class_conditional=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(bad, 16, class_conditional=False)
    with pytest.raises(OSError, match="x.png"):
        ds[0]


def test_digits():
    tr, te = DigitsDataset(16, "train"), DigitsDataset(16, "test")
    assert len(tr) + len(te) == 1797 and tr[0]["x"].shape == (1, 16, 16)
    assert set(tr.labels.tolist()) == set(range(10))
    assert tr.x.min() >= -1 and tr.x.max() <= 1 and tr.x.max() > 0.9
    assert make_grid(tr.x[:10], nrow=5).shape == (1, 2 + 2 * 18, 2 + 5 * 18)


def test_latent_store_roundtrip(tmp_path):
    vae_dir = tiny_vae(tmp_path / "vae")
    vae = load_vae(vae_dir)
    root = make_folder(tmp_path / "imgs", classes=["a", "b"], n=3, size=(20, 20))
    ds = ImageFolderDataset(root, 16, class_conditional=True, random_flip=False)
    out = tmp_path / "lat.zarr"
    attrs = encode_dataset(
        ds, out, space="latent", vae=vae, vae_path=vae_dir, flip=True, batch_size=4, shard_size=4, progress=False
    )
    assert attrs["shape"] == [4, 8, 8] and attrs["count"] == 6 and attrs["classes"] == ["a", "b"]
    with pytest.raises(FileExistsError, match="overwrite"):
        encode_dataset(ds, out, space="latent", vae=vae, progress=False)
    mean_ds = LatentDataset(out, sample=False, random_flip=False)
    m, s = encode(vae, ds.load(4)[None])
    torch.testing.assert_close(mean_ds[4]["x"], m[0], atol=1e-5, rtol=1e-4)
    assert mean_ds[4]["label"].item() == 1
    # sampled latents: mean + std * eps, different every read, scaled by 0.18215
    samp = LatentDataset(out, sample=True, random_flip=False, in_memory=False)
    a, b = samp[4]["x"], samp[4]["x"]
    assert not torch.equal(a, b)
    assert ((a - m[0]).abs() <= 6 * s[0] + 1e-6).all()
    # flipped encodings are stored and used
    flipped = LatentDataset(out, sample=False, random_flip=True)
    mf, _ = encode(vae, ds.load(4, flip=True)[None])
    seen = {int(torch.allclose(flipped[4]["x"], mf[0], atol=1e-5)) for _ in range(30)}
    assert seen == {0, 1}
    assert decode(vae, m).shape == (1, 3, 16, 16)


def test_pixel_store_and_vae_errors(tmp_path):
    ds = DigitsDataset(8, "test")
    out = tmp_path / "pix.zarr"
    encode_dataset(ds, out, space="pixel", shard_size=100, progress=False)
    px = LatentDataset(out, random_flip=False)
    assert len(px) == len(ds) and px.num_classes == 10
    torch.testing.assert_close(px[7]["x"], ds[7]["x"], atol=1 / 127.5, rtol=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "missing")
    not_vae = tmp_path / "unet"
    not_vae.mkdir()
    (not_vae / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        load_vae(not_vae)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_vae(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a latent store|not a zarr"):
        LatentDataset(tmp_path / "plain")
