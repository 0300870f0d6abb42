"""Image-encoder choices: one encoder per camera (Diffusion Policy) or one shared, crop and colour-jitter switches."""

import pytest
import torch

from shortcut_policy.nets.augment import ColorJitter
from shortcut_policy.nets.obs_encoders import ObsEncoder

SHAPES = {"cam0": (3, 64, 64), "cam1": (3, 64, 64), "pos": (2,)}


def _enc(**kw):
    torch.manual_seed(0)
    return ObsEncoder(
        SHAPES, ["pos"], ["cam0", "cam1"], 2, crop_shape=(56, 56), feature_dim=8, resnet_width=16, num_kp=4, **kw
    )


def _obs(b=3):
    g = torch.Generator().manual_seed(1)
    return {
        "cam0": torch.rand(b, 2, 3, 64, 64, generator=g) * 2 - 1,
        "cam1": torch.rand(b, 2, 3, 64, 64, generator=g) * 2 - 1,
        "pos": torch.rand(b, 2, 2, generator=g),
    }


def test_shared_encoder_has_one_trunk_and_the_same_output_size():
    per, shared = _enc(), _enc(share_encoder=True)
    n_per = sum(p.numel() for p in per.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_per == 2 * n_shared  # two cameras, one trunk
    assert shared.cams["cam0"] is shared.cams["cam1"] and per.cams["cam0"] is not per.cams["cam1"]
    per.eval(), shared.eval()
    o = _obs()
    assert per(o).shape == shared(o).shape == (3, per.out_dim)
    # the shared trunk sees each camera's own image: swapping the two cameras swaps their feature blocks
    f = shared(o).reshape(3, 2, -1)
    g = shared({**o, "cam0": o["cam1"], "cam1": o["cam0"]}).reshape(3, 2, -1)
    assert torch.allclose(f[..., :8], g[..., 8:16]) and not torch.allclose(f[..., :8], f[..., 8:16])
    sd = shared.state_dict()
    assert all(torch.equal(sd[k], sd[k.replace("cams.cam0.", "cams.cam1.")]) for k in sd if k.startswith("cams.cam0."))


def test_shared_encoder_refuses_cameras_of_different_shapes():
    with pytest.raises(ValueError, match="share"):
        ObsEncoder({"a": (3, 64, 64), "b": (3, 24, 24)}, [], ["a", "b"], 2, share_encoder=True)


def test_color_jitter_only_in_training_and_within_range():
    jit = ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    jit.train()
    y = jit(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.allclose(x, y)
    jit.eval()
    assert torch.equal(jit(x), x)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=1.5)
    enc = _enc(color_jitter={"brightness": 0.3})
    enc.eval()
    o = _obs()
    assert torch.equal(enc(o), enc(o))  # evaluation: centre crop, no jitter, deterministic
    enc.train()
    assert not torch.allclose(enc(o), enc(o))  # training: random crop and jitter


def test_no_crop_switch_keeps_the_full_image():
    enc = ObsEncoder(SHAPES, ["pos"], ["cam0", "cam1"], 2, crop_shape=None, feature_dim=8, resnet_width=16, num_kp=4)
    assert isinstance(enc.cams["cam0"].crop, torch.nn.Identity)


def test_resnet_width_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match=r"resnet_width=8: expected a positive multiple of 16"):
        ObsEncoder(SHAPES, ["pos"], ["cam0"], 2, resnet_width=8)


def test_crop_larger_than_the_image_names_both_shapes():
    with pytest.raises(ValueError, match=r"crop_shape=\[72, 72\] does not fit image 'cam0' of shape \[3, 64, 64\]"):
        ObsEncoder(SHAPES, ["pos"], ["cam0"], 2, crop_shape=(72, 72), resnet_width=16)
