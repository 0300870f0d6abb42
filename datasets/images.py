"""Image datasets (PIL only; torchvision is not usable here).

- ``ImageFolderDataset``: CelebA-HQ style (unconditional, every image under the root, recursively) or ImageNet style
  (class-conditional, one sub-folder per class, classes sorted by folder name). Preprocessing as the reference
  (kvfrans/shortcut-models utils/datasets.py): centre crop to the short side, resize to ``image_size`` with an
  antialiased bilinear filter, random horizontal flip (train), scale to [-1, 1].
- ``DigitsDataset``: scikit-learn's 8x8 digits (1,797 images, 10 classes, ships offline), upscaled.

Items are ``{"x": float tensor (C, H, W) in [-1, 1], "label": long tensor ()}``. Unconditional datasets yield label 0;
the image generator maps every label to the null label when the task is unconditional (kvfrans/shortcut-models
train.py:214).
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from shortcut_policy.utils import atomic_path

from .sanity import DataSanityWarning

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(p: Path) -> bool:
    """Whether ``p`` is a visible regular file with an image extension (``IMAGE_EXTENSIONS``, case-insensitive)."""
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted), zero-byte files included (see :func:`scan_images`)."""
    good, empty = scan_images(root)
    return sorted(good + empty)


def scan_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(non-empty image files, zero-byte image files) under ``root``, recursive and sorted; one ``stat`` per file
    with an image extension (hidden files skipped)."""
    good, empty = [], []
    for p in Path(root).rglob("*"):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            st = p.stat()
        except OSError:  # broken link, vanished file
            continue
        if stat.S_ISREG(st.st_mode):
            (good if st.st_size > 0 else empty).append(p)
    return sorted(good), sorted(empty)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre crop to the short side, then resize to size x size (bilinear, antialiased when downscaling)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.BILINEAR)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> float (C, H, W) in [-1, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0)


def load_image(path: Path, size: int, mode: str = "RGB") -> Image.Image:
    """Read ``path`` with PIL, convert to ``mode`` ("RGB" or "L"), centre-crop to the short side and resize to ``size``
    x ``size`` pixels (antialiased bilinear). Raises ``OSError`` naming the file when PIL cannot read it."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise OSError(f"cannot read image {path}: {e}") from e
    return center_crop_resize(im, size)


class ImageFolderDataset(Dataset):
    """An image folder, unconditional (all images under ``root``) or class-conditional (sub-folder = class).

    Zero-byte image files are skipped with a ``DataSanityWarning`` naming them; a class folder without images keeps
    its class index (labels follow the sorted folder names) and is named in a warning. A file that is not a
    readable image raises ``OSError`` naming it when it is loaded.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no image at all (or, class-conditional, no class sub-folder); ``channels`` not 1 or 3.
    """

    def __init__(
        self,
        root,
        image_size: int,
        class_conditional: bool,
        random_flip: bool = True,
        channels: int = 3,
        max_items: int | None = None,
    ):
        root = Path(str(root)).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
        self.root, self.image_size, self.random_flip = root, int(image_size), bool(random_flip)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: expected 1 (grayscale) or 3 (RGB)")
        self.mode = "RGB" if channels == 3 else "L"
        self.class_conditional = bool(class_conditional)
        if self.class_conditional:
            class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not class_dirs:
                raise ValueError(
                    f"class-conditional image folder {root} has no class sub-folders "
                    "(expected one folder per class, e.g. ImageNet's train/n01440764/...)"
                )
            self.classes = [d.name for d in class_dirs]
            self.items: list[tuple[Path, int]] = []
            empty_files: list[Path] = []
            empty_classes: list[str] = []
            for i, d in enumerate(class_dirs):
                good, empty = scan_images(d)
                self.items += [(p, i) for p in good]
                empty_files += empty
                if not good:
                    empty_classes.append(d.name)
            if empty_classes and len(empty_classes) < len(class_dirs):
                shown = ", ".join(empty_classes[:20]) + (
                    f", ... ({len(empty_classes)} in all)" if len(empty_classes) > 20 else ""
                )
                warnings.warn(
                    f"image folder {root}: {len(empty_classes)} class folder(s) contain no images and yield no "
                    f"items (their class indices are kept): {shown}",
                    DataSanityWarning,
                    stacklevel=2,
                )
        else:
            self.classes = []
            good, empty_files = scan_images(root)
            self.items = [(p, 0) for p in good]
        if empty_files:
            shown = ", ".join(str(p.relative_to(root)) for p in empty_files[:20])
            more = f", ... ({len(empty_files)} in all)" if len(empty_files) > 20 else ""
            warnings.warn(
                f"image folder {root}: skipped {len(empty_files)} empty (0-byte) image file(s): {shown}{more}",
                DataSanityWarning,
                stacklevel=2,
            )
        if not self.items:
            also = f" ({len(empty_files)} image file(s) are empty, 0 bytes)" if empty_files else ""
            raise ValueError(f"image folder {root} contains no images{also} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        if max_items is not None:
            self.items = self.items[: int(max_items)]

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.class_conditional else 1

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, flip: bool = False) -> torch.Tensor:
        """Image ``i`` as a float tensor (C, S, S) in [-1, 1], mirrored horizontally when ``flip``."""
        path, _ = self.items[i]
        img = load_image(path, self.image_size, self.mode)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def __getitem__(self, i: int) -> dict:
        flip = self.random_flip and bool(torch.randint(0, 2, ()).item())
        return {"x": self.load(i, flip), "label": torch.tensor(self.items[i][1], dtype=torch.long)}


class TensorImageDataset(Dataset):
    """In-memory images ``x`` (N, C, H, W) float in [-1, 1] and integer ``labels`` (N,).

    Items are ``{"x": (C, H, W), "label": long scalar}``; with ``random_flip`` each read mirrors the image
    horizontally with probability 1/2 (torch's global RNG).
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, random_flip: bool = False):
        self.x, self.labels, self.random_flip = x, labels.long(), random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        if self.random_flip and bool(torch.randint(0, 2, ()).item()):
            x = x.flip(-1)
        return {"x": x, "label": self.labels[i]}


def digits_arrays(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits upscaled (bilinear) to image_size: uint8 (N, 1, S, S), labels (N,)."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import, only the digits task uses it

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    if image_size != 8:
        imgs = np.stack(
            [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR)) for im in imgs]
        )
    return imgs[:, None], d.target.astype(np.int64)


class DigitsDataset(TensorImageDataset):
    """scikit-learn's 1797 8x8 digits upscaled to ``image_size`` (1, S, S) in [-1, 1], labels 0..9, split
    deterministically: ``split`` in {"train", "test", "all"} (test = every 5th image). Raises ``ValueError`` for
    another split."""

    def __init__(self, image_size: int = 16, split: str = "train", random_flip: bool = False):
        imgs, labels = digits_arrays(image_size)
        idx = np.arange(len(labels))
        if split == "train":
            idx = idx[idx % 5 != 0]
        elif split == "test":
            idx = idx[idx % 5 == 0]
        elif split != "all":
            raise ValueError(f"split={split!r}: expected train, test or all")
        # digits are not flip-invariant: random_flip is off by default
        super().__init__(
            torch.from_numpy(imgs[idx]).float().div_(127.5).sub_(1.0), torch.from_numpy(labels[idx]), random_flip
        )
        self.num_classes, self.classes = 10, [str(i) for i in range(10)]


def write_image(path, x: torch.Tensor) -> None:
    """Save a (C, H, W) tensor in [-1, 1] as PNG (atomic)."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy().transpose(1, 2, 0)
    img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
    with atomic_path(path, keep_suffix=True) as tmp:  # PIL picks the format from the suffix
        img.save(tmp)


def make_grid(x: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) -> (C, rows*(H+pad)+pad, nrow*(W+pad)+pad)."""
    B, C, H, W = x.shape
    nrow = max(1, min(nrow, B))
    rows = (B + nrow - 1) // nrow
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), pad_value, dtype=x.dtype)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = x[
            i
        ].cpu()
    return grid
