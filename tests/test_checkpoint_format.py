"""Checkpoint format versions: a format-1 checkpoint (written before the Diffusion Policy fidelity fixes) loads,
is migrated to the current format in memory, and predicts exactly what it predicted before.

The expected numbers were produced by the format-1 code (commit c367bcf) with the construction in ``_policy``
below (same seed, same tiny nets): ``predict_action`` with a seeded generator and one seeded training loss, for the
diffusion objective (DDPM-10 and DDIM-5: the net saw t = 1 - k/K times 100 and had the step-size branch), shortcut
and flow matching (the step-size branch, format 1's sinusoid rounding)."""

import warnings

import numpy as np
import pytest
import torch

from shortcut_policy.checkpoint import FORMAT_VERSION, load_checkpoint, migrate, save_checkpoint
from shortcut_policy.datasets.normalizer import LinearNormalizer
from shortcut_policy.policy import build_policy, load_policy

# (objective, sampling steps, sample kwargs) -> (executed actions (3, 4, 2) flattened, px; loss of a seeded batch)
FORMAT1 = {
    ("diffusion", 10, ""): (
        [499.86276, 8.41014, 492.63681, 8.41014, 56.09612, 170.99104, 499.86276, 491.69089, 488.22812, 487.58527]
        + [499.2742, 491.69089, 499.86276, 428.96033, 499.86276, 491.69089, 499.86276, 386.11404, 182.25023]
        + [131.47107, 486.4035, 12.09029, 499.86276, 8.41014],
        0.963959,
    ),
    ("diffusion", 5, "ddim"): (
        [1.69946, 9.82682, 453.36832, 8.42143, 1.68192, 10.48186, 3.72997, 490.96573, 498.99063, 491.01678]
        + [499.86276, 489.85583, 1.60365, 491.12036, 498.66422, 199.03392, 498.12607, 9.42957, 498.94589]
        + [351.82657, 495.78549, 10.85294, 395.19751, 491.62509],
        0.963959,
    ),
    ("shortcut", 2, ""): (
        [2.16618, 8.41014, 138.20404, 83.61554, 1.59064, 8.41014, 1.59064, 303.78061, 348.185, 274.87555]
        + [377.55713, 292.95047, 1.59064, 424.28894, 450.75446, 180.98997, 211.99825, 40.88581, 219.36343]
        + [239.95874, 209.34941, 109.15535, 149.57445, 292.39182],
        0.984179,
    ),
    ("flow_matching", 4, ""): (
        [1.95494, 8.41014, 139.69818, 82.74843, 1.59064, 8.41014, 1.59064, 302.82617, 346.90341, 274.92868]
        + [378.04959, 292.01559, 1.59064, 424.31918, 451.40521, 180.79739, 214.08516, 39.02369, 217.68623]
        + [241.05791, 208.96117, 109.30972, 151.47961, 291.62048],
        1.450265,
    ),
}


def _format1_cfg(name: str) -> dict:
    """The config a format-1 run stored: the U-Net with its step-size branch on, no format-2 keys."""
    obj = {"name": name} if name == "diffusion" else {"name": name, "m": 8}
    return {
        "task": {
            "name": "toy",
            "obs_shapes": {"obs": [4]},
            "lowdim_keys": ["obs"],
            "image_keys": [],
            "n_obs_steps": 2,
            "action_dim": 2,
            "horizon": 8,
            "n_action_steps": 4,
        },
        "net": {
            "kind": "unet1d",
            "step_embed_dim": 16,
            "down_dims": [8, 16],
            "kernel_size": 5,
            "n_groups": 4,
            "cond_predict_scale": True,
            "use_step_size": True,
            "time_scale": 100.0,
        },
        "objective": obj,
        "train": {"eval_model": "ema"},
    }


def _policy(cfg):
    """The policy of ``cfg`` with seeded weights (the final conv scaled down so that few actions hit the clamp)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    norm = LinearNormalizer().fit(
        {"obs": torch.rand(64, 4, generator=g) * 100, "action": torch.rand(64, 2, generator=g) * 500}
    )
    p = build_policy(cfg, norm)
    with torch.no_grad():
        p.net.final_conv[1].weight.mul_(0.05)
    return p


def _write_format1(path, cfg, policy, versioned=True):
    sd = policy.state_dict()
    payload = {"cfg": cfg, "model": sd, "ema": {"model": sd, "step": 0}, "step": 0}
    if versioned:
        payload = {"format_version": 1, **payload}
    torch.save(payload, path)  # written as format 1 did (not through save_checkpoint, which stamps the new version)


@pytest.mark.parametrize("key", list(FORMAT1), ids=lambda k: f"{k[0]}-{k[1]}{k[2]}")
def test_format1_checkpoint_loads_and_predicts_as_before(tmp_path, key):
    name, steps, sampler = key
    cfg = _format1_cfg(name)
    # the same construction under the migrated settings gives the format-1 weights (same modules, same seed)
    pinned = {**cfg, "net": {**cfg["net"], "embed_freqs": "legacy"}}
    if name == "diffusion":
        pinned["objective"] = {**cfg["objective"], "time_input": "flipped"}
    path = tmp_path / "old.ckpt"
    _write_format1(path, cfg, _policy(pinned), versioned=name != "flow_matching")  # a file without a version too
    ck = load_checkpoint(path)
    assert ck["format_version"] == FORMAT_VERSION and ck["migrated_from"] == 1
    expect = {"net.use_step_size": True, "net.embed_freqs": "legacy"}
    assert ck["migration"] == expect | ({"objective.time_input": "flipped"} if name == "diffusion" else {})
    policy = load_policy(path)
    assert policy.net.step_size_embed is not None  # the branch it was trained with
    assert policy.net.time_embed.freqs == "legacy"  # format 1's sinusoid rounding (changes outputs by ~3e-5 px)
    kw = {"sampler": sampler} if sampler else {}
    obs = {"obs": (torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(5)) * 100).numpy()}
    act = policy.predict_action(obs, steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    want_act, want_loss = FORMAT1[key]
    # 5-decimal expectations; rtol for float32 reduction order (a clean-clone `make test` gave 1.2e-4 px on 171 px
    # after 10 DDIM steps, the file alone 0); a wrong migration moves actions by whole pixels
    np.testing.assert_allclose(act.reshape(-1), want_act, rtol=1e-5, atol=1e-4)
    gb = torch.Generator().manual_seed(9)
    batch = {"obs": {"obs": torch.rand(6, 2, 4, generator=gb) * 100}, "action": torch.rand(6, 8, 2, generator=gb) * 500}
    policy.train()
    torch.manual_seed(7)
    with warnings.catch_warnings():  # the shortcut loss may warn about the small batch (not under test)
        warnings.simplefilter("ignore")
        loss = policy.compute_loss(batch)[0].item()
    assert loss == pytest.approx(want_loss, abs=2e-6)
    # the same weights read as a current-format diffusion checkpoint predict differently: the migration matters
    if name == "diffusion":
        path2 = tmp_path / "new.ckpt"
        save_checkpoint(path2, {"cfg": pinned, "model": policy.state_dict(), "ema": {"model": policy.state_dict()}})
        ck2 = load_checkpoint(path2)
        assert "migrated_from" not in ck2
        ck2["cfg"]["objective"]["time_input"] = "step"
        torch.save(ck2, path2)
        new = load_policy(path2).predict_action(obs, steps=steps, generator=torch.Generator().manual_seed(1), **kw)
        assert np.abs(new - act).max() > 1.0


def test_newer_format_and_bad_version_are_refused(tmp_path):
    with pytest.raises(ValueError, match="newer than this shortcut_policy reads"):
        migrate({"format_version": FORMAT_VERSION + 1, "cfg": {}, "model": {}})
    with pytest.raises(ValueError, match="not a checkpoint format version"):
        migrate({"format_version": "two", "cfg": {}, "model": {}})
    # a current checkpoint is left as it is
    ck = {"format_version": FORMAT_VERSION, "cfg": {"objective": {"name": "diffusion"}}, "model": {}}
    assert migrate(ck) is ck and "time_input" not in ck["cfg"]["objective"]


def test_resume_of_a_format1_run_names_the_settings_to_restore():
    from shortcut_policy.train.trainer import check_resume

    old = migrate({"format_version": 1, "cfg": _format1_cfg("diffusion"), "model": {}})["cfg"]
    new = {**old, "net": {**old["net"], "use_step_size": False}, "objective": {"name": "diffusion"}}
    new["net"].pop("embed_freqs")
    with pytest.raises(ValueError) as e:
        check_resume(new, old, "last.ckpt")
    msg = str(e.value)
    for restore in ("objective.time_input=flipped", "net.use_step_size=true", "+net.embed_freqs=legacy"):
        assert restore in msg


def test_resuming_a_format1_run_keeps_its_settings(pusht_lowdim_zarr, tmp_path):
    """A run trained before format 2 and resumed with today's defaults continues with the settings it was trained
    with (time input, step-size branch, sinusoid), noted in RESULT, instead of being refused."""
    from shortcut_policy import cli

    run = tmp_path / "run"
    common = [
        "task=pusht_lowdim",
        f"task.dataset.zarr_path={pusht_lowdim_zarr}",
        "net=unet1d_small",
        "net.down_dims=[16,32]",
        "net.step_embed_dim=16",
        "objective=diffusion",
        "logger=none",
        "train.batch_size=8",
        "train.eval_every=0",
        "train.warmup_steps=1",
        f"run_dir={run}",
    ]
    # a format-1 run: its config as format 1 stored it, weights of a net with the branch
    cli.run_verb(
        "train",
        [
            *common,
            "train.num_steps=2",
            "net.use_step_size=true",
            "+net.embed_freqs=legacy",
            "objective.time_input=flipped",
        ],
    )
    last = run / "checkpoints" / "last.ckpt"
    ck = torch.load(last, weights_only=False)
    ck["format_version"] = 1
    del ck["cfg"]["net"]["embed_freqs"], ck["cfg"]["objective"]["time_input"]
    torch.save(ck, last)
    res = cli.run_verb("train", [*common, "train.num_steps=3"])
    assert res["steps"] == 3
    assert res["preflight"]["kept_format_settings"] == {
        "from_format": 1,
        "net.use_step_size": True,
        "net.embed_freqs": "legacy",
        "objective.time_input": "flipped",
    }
    policy = load_policy(last)
    assert policy.objective.time_input == "flipped" and policy.net.step_size_embed is not None


def test_a_run_that_predates_an_added_objective_key_resumes_only_under_its_default():
    """objective.preconditioning / sigma_data / bootstrap_weight came after runs were written: such a checkpoint
    resumes under the option's constructor default (what it trained with), and is refused under any other value or
    for a key the objective does not have."""
    from shortcut_policy.train.trainer import check_resume

    old = {"objective": {"name": "shortcut", "m": 16}, "net": {}, "task": {}, "train": {}}
    same = {
        **old,
        "objective": {**old["objective"], "preconditioning": "none", "sigma_data": 0.5, "bootstrap_weight": 1.0},
    }
    assert check_resume(same, old, "last.ckpt") == {}
    other = {**old, "objective": {**same["objective"], "preconditioning": "edm"}}
    with pytest.raises(ValueError, match="objective.preconditioning: checkpoint '<absent>' vs now 'edm'"):
        check_resume(other, old, "last.ckpt")
    with pytest.raises(ValueError, match="objective.sigma_data: checkpoint '<absent>' vs now 0.33"):
        check_resume({**old, "objective": {**same["objective"], "sigma_data": 0.33}}, old, "last.ckpt")
    with pytest.raises(ValueError, match="objective.unknown_option"):
        check_resume({**old, "objective": {**same["objective"], "unknown_option": 1}}, old, "last.ckpt")
    # a train option added later (train.eval_warm_start, train.eval_n_action_steps) is no change while it is off
    off = {**same, "train": {"eval_warm_start": None, "eval_n_action_steps": None}}
    assert check_resume(off, old, "last.ckpt") == {}
    on = {**same, "train": {"eval_warm_start": 0.875, "eval_n_action_steps": None}}
    assert check_resume(on, old, "last.ckpt") == {"train.eval_warm_start": ("<absent>", 0.875)}
