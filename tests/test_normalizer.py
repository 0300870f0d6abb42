"""LinearNormalizer: DP 'limits' semantics, the other modes, and state_dict round trips."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from shortcut_policy.datasets.normalizer import LinearNormalizer, NormalizerError, SingleFieldLinearNormalizer


def _data(seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-3, 7, (500, 4)).astype(np.float32)
    obs[:, 2] = 5.0  # constant feature
    obs[:, 3] = 2.0 + rng.uniform(0, 5e-5, 500)  # range below 1e-4
    act = rng.uniform(0, 512, (500, 2)).astype(np.float32)
    return obs, act


def test_limits_mode_matches_dp_rule():
    obs, act = _data()
    n = LinearNormalizer().fit({"obs": obs, "action": act}, mode="limits")
    f = n["obs"]
    mn, mx = obs.min(0), obs.max(0)
    np.testing.assert_allclose(f.scale[:2].numpy(), 2 / (mx[:2] - mn[:2]), rtol=1e-6)
    np.testing.assert_allclose(f.offset[:2].numpy(), -1 - 2 / (mx[:2] - mn[:2]) * mn[:2], rtol=1e-5, atol=1e-6)
    # features with range < 1e-4: scale 1, offset -min (only centred)
    np.testing.assert_array_equal(f.scale[2:].numpy(), [1.0, 1.0])
    np.testing.assert_allclose(f.offset[2:].numpy(), -mn[2:], rtol=1e-7)
    y = n.normalize({"obs": torch.from_numpy(obs), "action": torch.from_numpy(act)})
    np.testing.assert_allclose(y["obs"][:, :2].min(0).values.numpy(), [-1, -1], atol=1e-6)
    np.testing.assert_allclose(y["obs"][:, :2].max(0).values.numpy(), [1, 1], atol=1e-6)
    assert torch.all(y["obs"][:, 2] == 0)
    np.testing.assert_allclose(y["action"].min(0).values.numpy(), [-1, -1], atol=1e-6)
    stats = n.get_input_stats()["action"]
    np.testing.assert_allclose(stats["max"].numpy(), act.max(0))
    np.testing.assert_allclose(stats["mean"].numpy(), act.mean(0), rtol=1e-5)


def test_any_leading_shape_round_trip_and_dtype():
    obs, act = _data(1)
    n = LinearNormalizer().fit({"action": act})
    x = torch.randn(3, 5, 16, 2, dtype=torch.float64) * 100 + 256
    y = n.normalize({"action": x})["action"]
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(n.unnormalize({"action": y})["action"], x)
    # a bare array fits the "_default" field, and tensors use it
    d = LinearNormalizer().fit(act)
    torch.testing.assert_close(d.normalize(torch.from_numpy(act)), n.normalize({"action": act})["action"])
    # nested batches ({"obs": {...}, "action": ...}) are normalized field by field
    m = LinearNormalizer().fit({"obs": obs, "action": act})
    b = m.normalize({"obs": {"obs": obs[:7]}, "action": act[:7]})
    torch.testing.assert_close(b["obs"]["obs"], m["obs"].normalize(obs[:7]))


def test_other_modes():
    obs, act = _data(2)
    img = SingleFieldLinearNormalizer.create_image()
    x = torch.rand(2, 3, 3, 8, 8)
    torch.testing.assert_close(img.normalize(x), x * 2 - 1)
    torch.testing.assert_close(img.unnormalize(img.normalize(x)), x)
    ident = SingleFieldLinearNormalizer.create_fit(act, mode="identity")
    torch.testing.assert_close(ident.normalize(act), torch.from_numpy(act))
    ma = SingleFieldLinearNormalizer.create_fit(obs, mode="max_abs")  # robomimic: one global scalar
    s = 1.0 / np.abs(obs).max()
    np.testing.assert_allclose(ma.scale.numpy(), np.full(4, s), rtol=1e-6)
    assert torch.all(ma.offset == 0)
    assert float(ma.normalize(obs).abs().max()) == pytest.approx(1.0)
    g = SingleFieldLinearNormalizer.create_fit(act, mode="gaussian")
    z = g.normalize(act)
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    # per-segment modes: abs dual-arm style [pos limits 2 | identity 2]
    seg = SingleFieldLinearNormalizer.create_fit(obs, mode=[["limits", 2], ["identity", 2]])
    lim = SingleFieldLinearNormalizer.create_fit(obs[:, :2], mode="limits")
    torch.testing.assert_close(seg.scale, torch.cat([lim.scale, torch.ones(2)]))
    torch.testing.assert_close(seg.offset, torch.cat([lim.offset, torch.zeros(2)]))
    with pytest.raises(NormalizerError, match="sum to the last dim 4"):
        SingleFieldLinearNormalizer.create_fit(obs, mode=[["limits", 3]])
    with pytest.raises(NormalizerError, match="unknown normalizer mode 'minmax'"):
        LinearNormalizer().fit({"obs": obs}, mode="minmax")


class _Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.normalizer = LinearNormalizer()


def test_state_dict_round_trip_into_fresh_modules():
    obs, act = _data(3)
    p = _Policy()
    p.normalizer.fit({"obs": obs, "action": act}, mode={"obs": "limits", "action": "max_abs"})
    p.normalizer["image"] = SingleFieldLinearNormalizer.create_image()
    sd = p.state_dict()
    # Diffusion Policy's key layout, all buffers (never optimizer parameters)
    assert "normalizer.params_dict.obs.scale" in sd and "normalizer.params_dict.action.input_stats.std" in sd
    assert {n for n, _ in p.named_parameters()} == {"net.weight", "net.bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    q = _Policy()  # nothing fit: fields and shapes are created by load_state_dict
    q.load_state_dict(loaded)
    assert sorted(q.normalizer.keys()) == ["action", "image", "obs"]
    for k in ("obs", "action"):
        x = torch.from_numpy(obs if k == "obs" else act)
        torch.testing.assert_close(q.normalizer[k].normalize(x), p.normalizer[k].normalize(x))
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(q.normalizer["image"].normalize(x), x * 2 - 1)
    r = LinearNormalizer.from_state_dict(sd, prefix="normalizer.")
    torch.testing.assert_close(r["obs"].offset, p.normalizer["obs"].offset)
    # a normalizer fit on other shapes is reshaped by the load too
    other = LinearNormalizer().fit({"obs": np.random.rand(10, 7), "action": act})
    other.load_state_dict(p.normalizer.state_dict())
    assert other["obs"].scale.shape == (4,)
    # strict loading still reports fields the checkpoint lacks
    extra = LinearNormalizer().fit({"obs": obs, "action": act, "more": act})
    with pytest.raises(RuntimeError, match="params_dict.more"):
        extra.load_state_dict(p.normalizer.state_dict())


def test_errors_nonfinite_unfit_and_wrong_dim():
    obs, act = _data(4)
    bad = obs.copy()
    bad[17, 1] = np.nan
    with pytest.raises(NormalizerError, match=r"'obs'.*non-finite.*row 17, feature 1"):
        LinearNormalizer().fit({"obs": bad, "action": act})
    inf = act.copy()
    inf[3, 0] = np.inf
    with pytest.raises(NormalizerError, match=r"'action'.*non-finite"):
        LinearNormalizer().fit({"action": inf})
    n = LinearNormalizer().fit({"obs": obs})
    with pytest.raises(NormalizerError, match=r"'action' was not fit.*\['obs'\]"):
        n.normalize({"action": act})
    with pytest.raises(NormalizerError, match=r"'obs' was fit on 4 features.*\(5, 3\)"):
        n.normalize({"obs": torch.zeros(5, 3)})
    with pytest.raises(NormalizerError, match="not fit and not loaded"):
        SingleFieldLinearNormalizer().normalize(torch.zeros(2))
    assert math.isfinite(float(LinearNormalizer().fit({"z": np.zeros((5, 2))}, mode="max_abs")["z"].scale[0]))
