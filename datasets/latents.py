"""Encode an image dataset once into zarr shards, and read it back for training.

``shortcut-policy latents task=imagenet256 [vae_path=...] [out=...]``

Latent mode (``task.space=latent``): a diffusers ``AutoencoderKL`` loaded from a local directory (sd-vae-ft-mse
layout: config.json + weights) encodes every image; the posterior mean and std, both multiplied by the latent scale
(0.18215), are stored. ``LatentDataset`` then returns a fresh posterior sample ``mean + std * eps`` each time an item
is read (the reference encodes online with ``latent_dist.sample()``, so the mean alone would be a different
training distribution) or the mean (``sample=False``).
With ``flip=true`` the horizontally flipped image is encoded too and an item picks one of the two at random, which
reproduces the reference's random-flip augmentation.

Pixel mode (``task.space=pixel``): no VAE, the centre-cropped resized images are stored as uint8.

Layout (zarr v3, arrays sharded along the item axis, one inner chunk per item for random access)::

    label (N,) int64
    mean, std [, mean_flip, std_flip] (N, C, h, w) float32     # latent mode, already scaled
    pixels (N, C, H, W) uint8                                   # pixel mode
    attrs: format, space, scale, vae_path, image_size, shape, num_classes, classes, flip, count, source
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset
from tqdm import tqdm

from shortcut_policy.conventions import VAE_LATENT_SCALE
from shortcut_policy.utils import atomic_path

from .images import DigitsDataset, ImageFolderDataset

FORMAT = "shortcut_policy.latents/1"


def load_vae(path, device="cpu"):
    """diffusers AutoencoderKL from a local directory; a clear error for anything else."""
    path = Path(str(path)).expanduser()
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(
            f"VAE directory {path} does not exist (expected a diffusers AutoencoderKL folder, "
            "e.g. stabilityai/sd-vae-ft-mse saved with save_pretrained)"
        )
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a diffusers AutoencoderKL directory: no config.json")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    if cls_name != "AutoencoderKL":
        raise ValueError(f"{path} holds a {cls_name!r}, not an AutoencoderKL (config.json _class_name)")
    from diffusers import AutoencoderKL  # lazy: diffusers' model classes are slow to load, only latent tasks need one

    try:
        vae = AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False)  # no `accelerate` needed
    except Exception as e:
        raise ValueError(f"cannot load the AutoencoderKL in {path}: {e}") from e
    return vae.to(device).eval().requires_grad_(False)


def vae_downsample(vae) -> int:
    """The VAE's spatial downsampling factor, 2^(number of encoder blocks - 1) (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, x: torch.Tensor, scale: float = VAE_LATENT_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> (scaled posterior mean, scaled posterior std)."""
    dist = vae.encode(x).latent_dist
    return dist.mean * scale, dist.std * scale


@torch.no_grad()
def decode(vae, z: torch.Tensor, scale: float = VAE_LATENT_SCALE) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (clipped)."""
    return vae.decode(z / scale).sample.clamp(-1, 1)


def items_source(cfg_task, max_items=None):
    """The image dataset a task encodes: scikit-learn digits (``task.source=digits``) or an image folder
    (``task.data_dir``, default source), without random flips; ``max_items`` caps a folder's size. Raises
    ``ValueError`` for another source."""
    source = cfg_task.get("source", "folder")
    if source == "digits":
        return DigitsDataset(int(cfg_task.image_size), split=cfg_task.get("split", "train"))
    if source != "folder":
        raise ValueError(f"task.source={source!r}: expected folder or digits")
    return ImageFolderDataset(
        cfg_task.data_dir,
        int(cfg_task.image_size),
        bool(cfg_task.class_conditional),
        random_flip=False,
        channels=int(cfg_task.get("image_channels", 3)),
        max_items=max_items,
    )


def _load_plain(ds, i, flip):
    """Image ``i`` of ``ds`` (C, H, W) in [-1, 1], mirrored when ``flip``: through ``ds.load`` when the dataset has
    one (no random flip), else ``ds[i]["x"]``."""
    if hasattr(ds, "load"):
        return ds.load(i, flip)
    x = ds[i]["x"]
    return x.flip(-1) if flip else x


def encode_dataset(
    ds,
    out,
    *,
    space: str = "latent",
    vae=None,
    vae_path=None,
    scale: float = VAE_LATENT_SCALE,
    flip: bool = True,
    batch_size: int = 32,
    shard_size: int = 1024,
    device="cpu",
    overwrite: bool = False,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Encode every item of ``ds`` (a dataset with ``items``/``load`` or ``x``/``labels``) into ``out``."""
    out = Path(str(out)).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    if space not in ("latent", "pixel"):
        raise ValueError(f"space={space!r}: expected latent or pixel")
    if space == "latent" and vae is None:
        raise ValueError("latent mode needs a VAE (vae_path)")
    n = len(ds)
    if hasattr(ds, "labels"):
        labels = np.asarray(ds.labels, dtype=np.int64)
    elif hasattr(ds, "items"):
        labels = np.array([it[1] for it in ds.items], dtype=np.int64)
    else:
        labels = np.array([int(ds[i]["label"]) for i in range(n)], dtype=np.int64)
    probe = _load_plain(ds, 0, False)
    C, H, W = probe.shape
    with atomic_path(out) as tmp:  # a zarr directory store, renamed onto `out` when complete
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        shard = max(1, min(int(shard_size), n))
        g.create_array("label", shape=(n,), dtype="int64", chunks=(shard,))[:] = labels
        if space == "latent":
            with torch.no_grad():
                m0, _ = encode(vae, probe[None].to(device), scale)
            shape = tuple(m0.shape[1:])
            names = ["mean", "std"] + (["mean_flip", "std_flip"] if flip else [])
            arrs = {
                k: g.create_array(k, shape=(n, *shape), dtype="float32", chunks=(1, *shape), shards=(shard, *shape))
                for k in names
            }
        else:
            shape = (C, H, W)
            arrs = {
                "pixels": g.create_array(
                    "pixels", shape=(n, *shape), dtype="uint8", chunks=(1, *shape), shards=(shard, *shape)
                )
            }
        bar = tqdm(total=n, desc=f"encoding {space} -> {out.name}", unit="img", disable=not progress)
        for s0 in range(0, n, shard):  # fill one shard at a time (whole-shard writes)
            s1 = min(n, s0 + shard)
            buf = {k: [] for k in arrs}
            for b0 in range(s0, s1, batch_size):
                b1 = min(s1, b0 + batch_size)
                x = torch.stack([_load_plain(ds, i, False) for i in range(b0, b1)])
                if space == "latent":
                    m, sd = encode(vae, x.to(device), scale)
                    buf["mean"].append(m.float().cpu().numpy())
                    buf["std"].append(sd.float().cpu().numpy())
                    if flip:
                        mf, sf = encode(vae, x.flip(-1).to(device), scale)
                        buf["mean_flip"].append(mf.float().cpu().numpy())
                        buf["std_flip"].append(sf.float().cpu().numpy())
                else:
                    buf["pixels"].append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
                bar.update(b1 - b0)
            for k, a in arrs.items():
                a[s0:s1] = np.concatenate(buf[k])
        bar.close()
        attrs = {
            "format": FORMAT,
            "space": space,
            "scale": float(scale) if space == "latent" else None,
            "vae_path": str(vae_path) if vae_path else None,
            "image_size": [int(H), int(W)],
            "shape": [int(s) for s in shape],
            "count": int(n),
            "flip": bool(flip and space == "latent"),
            "num_classes": int(getattr(ds, "num_classes", 1)),
            "classes": list(getattr(ds, "classes", [])),
            **(meta or {}),
        }
        g.attrs.update(attrs)
    return attrs


class LatentDataset(Dataset):
    """Items ``{"x": (C, h, w) float32, "label": long}`` from a store written by ``encode_dataset``.

    Latent stores: ``sample=True`` draws ``mean + std * eps`` at every read (reference behaviour), ``False`` the mean;
    with flipped encodings present, each read picks the flipped one with probability 1/2 (``random_flip``).
    Pixel stores: uint8 -> [-1, 1], random horizontal flip when ``random_flip``.
    ``in_memory`` loads all arrays at construction (default: when the store is under 2 GiB).
    """

    def __init__(self, path, sample: bool = True, random_flip: bool = True, in_memory: bool | None = None):
        path = Path(str(path)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"latent store {path} does not exist; create it with `shortcut-policy latents`")
        try:
            g = zarr.open_group(str(path), mode="r")
        except Exception as e:
            raise ValueError(f"{path} is not a zarr group written by `shortcut-policy latents`: {e}") from e
        self.attrs = dict(g.attrs)
        if self.attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not a latent store of format {FORMAT} (attrs: {sorted(self.attrs)})")
        self.path, self.space = path, self.attrs["space"]
        self.sample, self.random_flip = bool(sample), bool(random_flip)
        self.num_classes, self.classes = int(self.attrs["num_classes"]), list(self.attrs.get("classes", []))
        names = ["mean", "std", "mean_flip", "std_flip"] if self.space == "latent" else ["pixels"]
        self.arrays = {k: g[k] for k in names if k in g}
        self.labels = torch.from_numpy(np.asarray(g["label"][:]))
        nbytes = sum(a.nbytes for a in self.arrays.values())
        if in_memory is None:
            in_memory = nbytes < 2 * 2**30
        if in_memory:
            self.arrays = {k: torch.from_numpy(np.asarray(a[:])) for k, a in self.arrays.items()}
        self.in_memory = bool(in_memory)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.attrs["shape"])

    def __len__(self) -> int:
        return len(self.labels)

    def _get(self, k, i):
        """Row ``i`` of array ``k`` as a tensor (from memory, or read from the zarr store)."""
        a = self.arrays[k][i]
        return a if self.in_memory else torch.from_numpy(np.asarray(a))

    def __getitem__(self, i: int) -> dict:
        flip = self.random_flip and bool(torch.randint(0, 2, ()).item())
        if self.space == "latent":
            sfx = "_flip" if flip and "mean_flip" in self.arrays else ""
            x = self._get("mean" + sfx, i).float()
            if self.sample:
                x = x + self._get("std" + sfx, i).float() * torch.randn_like(x)
        else:
            x = self._get("pixels", i).float().div(127.5).sub(1.0)
            if flip:
                x = x.flip(-1)
        return {"x": x, "label": self.labels[i]}
