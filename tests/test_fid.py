"""FID: Fréchet distance vs a direct scipy computation, the three Inception weight formats, cached statistics."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from shortcut_policy.eval.fid import (
    BasicConv2d,
    InceptionFeatures,
    InceptionV3FID,
    default_inception_path,
    feature_statistics,
    frechet_distance,
    load_stats,
    reference_stats,
    save_stats,
)


def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2, eps=0.0) == pytest.approx(direct, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-4)  # eps*I barely moves it
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # 1-D Gaussians: (m1-m2)^2 + (sd1-sd2)^2
    assert frechet_distance([0.0], [[4.0]], [1.0], [[1.0]], eps=0.0) == pytest.approx(1.0 + 1.0)
    assert feature_statistics(a)[1].shape == (16, 16)
    # fewer samples than dimensions (singular covariances): still the eps-regularised sqrtm value
    c, d = rng.normal(size=(40, 64)), rng.normal(size=(30, 64)) + 0.2
    (m3, s3), (m4, s4) = feature_statistics(c), feature_statistics(d)
    e = np.eye(64) * 1e-6
    direct = np.sum((m3 - m4) ** 2) + np.trace(s3 + s4 + 2 * e - 2 * scipy.linalg.sqrtm((s3 + e) @ (s4 + e)).real)
    assert frechet_distance(m3, s3, m4, s4) == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def _ts_to_pytorch_fid(ts) -> dict:
    """Rename the fid-helper TorchScript weights to pytorch-fid's .pth layout (BN without scale -> weight 1)."""
    groups = {}
    for k, v in ts.state_dict().items():
        pre, leaf = k.rsplit(".", 1)
        groups.setdefault(pre, {})[leaf] = v
    net = InceptionV3FID()
    names = [n for n, m in net.named_modules() if isinstance(m, BasicConv2d)]
    assert len(names) == len(groups) == 94
    sd = {}
    for n, g in zip(names, groups.values()):
        sd[f"{n}.conv.weight"] = g["weight"]
        sd[f"{n}.bn.weight"] = torch.ones_like(g["beta"])
        sd[f"{n}.bn.bias"] = g["beta"]
        sd[f"{n}.bn.running_mean"] = g["mean"]
        sd[f"{n}.bn.running_var"] = g["var"]
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # pytorch-fid files carry the fc
    return sd


def test_inception_formats_agree(tmp_path):
    path = default_inception_path()
    default = InceptionFeatures()
    assert default.kind == "torchscript" and default.path == path
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    f_default = default(x)
    assert f_default.shape == (2, 2048) and np.isfinite(f_default).all()

    # pytorch-fid state dict -> own InceptionV3 (no torchvision): same network, pytorch-fid's [-1, 1] input range
    pth = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(_ts_to_pytorch_fid(default.model), pth)
    ptfid = InceptionFeatures(pth)
    assert ptfid.kind == "pytorch-fid"
    x299 = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(ptfid.model(x299).numpy(), default.model(x299).numpy(), atol=1e-4, rtol=1e-4)
    # end to end the two differ only by the input range (TF [-1, 0.9921875] vs pytorch-fid [-1, 1])
    f_pt = ptfid(x)
    assert np.abs(f_pt - f_default).max() < 0.1 * np.abs(f_default).max()

    # clean-fid / StyleGAN TorchScript interface: forward(img in [0, 255], return_features)
    class NvidiaStyle(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.inner((img - 128.0) / 128.0)

    nv = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(NvidiaStyle(default.model)).save(str(nv))
    nvf = InceptionFeatures(nv)
    assert nvf.kind == "torchscript-nvidia"
    np.testing.assert_allclose(nvf(x), f_default, atol=1e-4, rtol=1e-4)

    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="pytorch-fid"):
        InceptionFeatures(bad)


def test_reference_stats_cached_with_resolution_check(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ext = InceptionFeatures()
    cache = tmp_path / "stats.npz"
    mu, sigma, meta, path = reference_stats(ext, 16, ref_stats=cache, ref_dir=folder)
    assert path == cache and cache.exists() and meta["count"] == 3 and meta["resolution"] == 16
    mtime = cache.stat().st_mtime_ns
    mu2, sigma2, meta2, _ = reference_stats(ext, 16, ref_stats=cache, ref_dir=folder)
    assert cache.stat().st_mtime_ns == mtime  # loaded, not recomputed
    np.testing.assert_array_equal(mu, mu2)
    with pytest.raises(ValueError, match="resolution=16"):
        reference_stats(ext, 32, ref_stats=cache)
    # `shortcut-policy fid samples_dir=...`: the reference folder against its own cached statistics -> 0
    from shortcut_policy.cli import run_verb

    res = run_verb(
        "fid",
        [f"samples_dir={folder}", f"ref_stats={cache}", "resolution=16", "device=cpu", f"run_dir={tmp_path / 'run'}"],
    )
    assert res["fid"] == pytest.approx(0.0, abs=1e-2) and res["n_samples"] == 3
    with pytest.raises(FileExistsError, match="overwrite"):
        save_stats(cache, mu, sigma, meta)
    # plain upstream npz (mu/sigma only) is accepted with a warning
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=mu, sigma=sigma)
    with pytest.warns(UserWarning, match="no metadata"):
        load_stats(plain, {"resolution": 256})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        reference_stats(ext, 16, ref_stats=tmp_path / "e.npz", ref_dir=empty)
