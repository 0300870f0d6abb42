"""`shortcut-policy import`: Diffusion Policy checkpoints, written here in Diffusion Policy's exact payload layout and
key names (tests/dp_reference.py, tiny U-Nets, no download), import and predict exactly as Diffusion Policy's sampling
loop does (DDPM-100 and DDIM-10, same observations and noise, 1e-5 in normalised units) for the low-dim and the
hybrid-image policy; bad inputs are refused before anything is written."""

import copy
import json
import pickle
import sys
import types

import dp_reference as R
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from omegaconf import OmegaConf

from shortcut_policy import cli
from shortcut_policy.policy import load_policy

try:
    import dill as PICKLER  # Diffusion Policy saves with dill
except ImportError:  # pragma: no cover - dill is in the dev extra
    PICKLER = pickle

SCHED = {
    "_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler",
    "num_train_timesteps": 100,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}
UNET = {"dsed": 16, "down_dims": [16, 32, 64], "kernel_size": 5, "n_groups": 8, "cps": True}
RUNNER = {"n_train": 6, "train_start_seed": 0, "n_test": 50, "test_start_seed": 100000, "max_steps": 300, "fps": 10}


def _ddim():
    kw = {k: v for k, v in SCHED.items() if k not in ("_target_", "variance_type")}
    return DDIMScheduler(**kw, set_alpha_to_one=True, steps_offset=0)  # Diffusion Policy's DDIM settings


def _ddpm():
    return DDPMScheduler(**{k: v for k, v in SCHED.items() if k != "_target_"})


def _shrink(policy, seed):
    """Known weights: a seeded init with the U-Net's output layer scaled down (fewer clipped samples)."""
    with torch.no_grad():
        policy.model.final_conv[1].weight.mul_(0.1)
    return policy


def _lowdim_cfg(**policy_over):
    pol = {
        "_target_": "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy",
        "model": {
            "_target_": "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D",
            "input_dim": 2,
            "local_cond_dim": None,
            "global_cond_dim": 40,
            "diffusion_step_embed_dim": UNET["dsed"],
            "down_dims": UNET["down_dims"],
            "kernel_size": 5,
            "n_groups": 8,
            "cond_predict_scale": True,
        },
        "noise_scheduler": dict(SCHED),
        "horizon": 16,
        "obs_dim": 20,
        "action_dim": 2,
        "n_action_steps": 8,
        "n_obs_steps": 2,
        "num_inference_steps": 100,
        "obs_as_local_cond": False,
        "obs_as_global_cond": True,
        "pred_action_steps_only": False,
        "oa_step_convention": True,
        **policy_over,
    }
    return {
        "name": "train_diffusion_unet_lowdim",
        "_target_": "diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace."
        "TrainDiffusionUnetLowdimWorkspace",
        "obs_dim": 20,
        "action_dim": 2,
        "task_name": "pusht_lowdim",
        "horizon": 16,
        "n_obs_steps": 2,
        "n_action_steps": 8,
        "n_latency_steps": 0,
        "obs_as_global_cond": True,
        "policy": pol,
        "ema": {"_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel", "power": 0.75},
        "training": {"device": "cuda:0", "seed": 42, "use_ema": True, "num_epochs": 5000},
        "task": {
            "name": "pusht_lowdim",
            "obs_dim": 20,
            "action_dim": 2,
            "keypoint_dim": 2,
            "env_runner": {
                "_target_": "diffusion_policy.env_runner.pusht_keypoints_runner.PushTKeypointsRunner",
                **RUNNER,
            },
        },
    }


def _hybrid_cfg(shape_meta_obs=None, **policy_over):
    obs = shape_meta_obs or {
        "image": {"shape": [3, 96, 96], "type": "rgb"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    }
    sm = {"obs": obs, "action": {"shape": [2]}}
    pol = {
        "_target_": "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy",
        "shape_meta": sm,
        "noise_scheduler": dict(SCHED),
        "horizon": 16,
        "n_action_steps": 8,
        "n_obs_steps": 2,
        "num_inference_steps": 100,
        "obs_as_global_cond": True,
        "crop_shape": [84, 84],
        "diffusion_step_embed_dim": UNET["dsed"],
        "down_dims": UNET["down_dims"],
        "kernel_size": 5,
        "n_groups": 8,
        "cond_predict_scale": True,
        "obs_encoder_group_norm": True,
        "eval_fixed_crop": True,
        **policy_over,
    }
    return {
        "name": "train_diffusion_unet_hybrid",
        "task_name": "pusht_image",
        "shape_meta": sm,
        "n_latency_steps": 0,
        "policy": pol,
        "training": {"use_ema": True},
        "task": {
            "name": "pusht_image",
            "shape_meta": sm,
            "env_runner": {"_target_": "diffusion_policy.env_runner.pusht_image_runner.PushTImageRunner", **RUNNER},
        },
    }


def _fields_lowdim(g):
    obs = torch.rand(500, 20, generator=g) * 512
    act = torch.rand(500, 2, generator=g) * 500 + 6
    return {"obs": R.limits_field(obs), "action": R.limits_field(act)}


def _fields_hybrid(g):
    return {
        "image": R.image_field(),
        "agent_pos": R.limits_field(torch.rand(500, 2, generator=g) * 512),
        "action": R.limits_field(torch.rand(500, 2, generator=g) * 500 + 6),
    }


def _save_dp(path, cfg, model, ema, extra=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    payload = {
        "cfg": OmegaConf.create(cfg),
        "state_dicts": {"model": model.state_dict(), "ema_model": ema.state_dict(), "optimizer": opt.state_dict()},
        "pickles": {
            "global_step": PICKLER.dumps(105000),
            "epoch": PICKLER.dumps(2500),
            "_output_dir": PICKLER.dumps("/data/outputs/run"),
        },
        **(extra or {}),
    }
    with open(path, "wb") as f:
        torch.save(payload, f, pickle_module=PICKLER)
    return path


def _import(ckpt, out, *more):
    # quoted: Diffusion Policy's checkpoint names contain '=' (epoch=0550-test_mean_score=0.969.ckpt)
    return cli.run_verb("import", [f"checkpoint='{ckpt}'", f"out={out}", f"run_dir={out}_run", *more])


def _compare(policy, ref, obs, sampler, steps, seed):
    """Max |project - reference| over the executed actions, in normalised units, and the share of unclipped ones."""
    sched = _ddpm() if sampler == "ddpm" else _ddim()
    want = R.dp_sample(ref, obs, sched, steps, 16, 2, torch.Generator().manual_seed(seed))
    got = policy.predict_action(
        {k: v.numpy() for k, v in obs.items()},
        steps=steps,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        return_numpy=False,
    )
    got_n = policy.normalizer.normalize({"action": got})["action"]
    want_exec = want[:, 1:9]  # action_pred[:, To - 1 : To - 1 + Ta]
    return float((got_n - want_exec).abs().max()), float((want_exec.abs() < 0.999).float().mean())


@pytest.fixture(scope="module")
def lowdim(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_lowdim")
    g = torch.Generator().manual_seed(0)
    fields = _fields_lowdim(g)
    torch.manual_seed(1)
    model = _shrink(R.DPLowdimPolicy(20, 2, 2, UNET, fields), 1)
    torch.manual_seed(2)
    ema = _shrink(R.DPLowdimPolicy(20, 2, 2, UNET, fields), 2)  # the EMA weights differ from the online ones
    ckpt = _save_dp(d / "epoch=0550-test_mean_score=0.969.ckpt", _lowdim_cfg(), model, ema)
    res = _import(ckpt, d / "out")
    return {"dir": d, "ckpt": ckpt, "res": res, "model": model.eval(), "ema": ema.eval()}


def test_lowdim_import_matches_diffusion_policy_sampling(lowdim):
    res = lowdim["res"]
    assert res["policy_class"] == "DiffusionUnetLowdimPolicy" and res["task"] == "pusht_lowdim"
    assert res["weights"] == "ema_model" and res["sampler"] == "ddpm" and res["num_inference_steps"] == 100
    assert any(s.startswith("pickles (_output_dir, epoch, global_step)") for s in res["skipped"])
    ckpt = lowdim["dir"] / "out" / "model.ckpt"
    assert json.loads((lowdim["dir"] / "out" / "import.json").read_text())["policy_class"] == res["policy_class"]
    policy = load_policy(ckpt)
    assert policy.default_steps == 100 and policy.net.step_size_embed is None
    assert policy.task_cfg["eval"]["seed_start"] == 100000 and policy.task_cfg["max_steps"] == 300
    gen = torch.Generator().manual_seed(11)
    obs = {"obs": torch.rand(3, 2, 20, generator=gen) * 512}
    for sampler, steps in (("ddpm", 100), ("ddim", 10)):
        diff, unclipped = _compare(policy, lowdim["ema"], obs, sampler, steps, seed=5)
        assert diff < 1e-5, (sampler, diff)
        assert unclipped > 0.5  # the comparison is not decided by the clamp to [-1, 1]
    # the online weights are in the checkpoint too (weights=online), and the EMA ones are what eval uses
    online = load_policy(ckpt, weights="online")
    diff, _ = _compare(online, lowdim["model"], obs, "ddim", 10, seed=6)
    assert diff < 1e-5
    assert _compare(policy, lowdim["model"], obs, "ddim", 10, seed=6)[0] > 1e-3


def test_imported_checkpoint_runs_eval_and_deploy(lowdim, tmp_path):
    ckpt = lowdim["dir"] / "out" / "model.ckpt"
    res = cli.run_verb(
        "eval",
        [f"checkpoint={ckpt}", "steps=[4]", "n_episodes=1", "workers=1", "n_videos=0", f"run_dir={tmp_path}/eval"],
    )
    assert 0.0 <= res["mean_score@4"] <= 1.0 and res["sampler"] == "ddpm"
    res = cli.run_verb(
        "deploy",
        [f"checkpoint={ckpt}", "steps=2", "n_steps=12", "hz=50", "warmup=1", "status=false", f"run_dir={tmp_path}/dep"],
    )
    assert res["steps"] == 2 and res["objective"] == "Diffusion"
    # export: the deterministic DDIM-N sampler as one graph, parity with the PyTorch policy
    common = [f"checkpoint={ckpt}", "format=torchscript", "steps=10", "n_parity=4", "n_timing=2", "threads=1"]
    res = cli.run_verb("export", [*common, f"out={tmp_path}/p.ts.pt", f"run_dir={tmp_path}/exp"])
    assert res["sampler"] == "ddim" and res["max_abs_diff_normalized"] < 1e-5
    with pytest.raises(ValueError, match="DDPM draws fresh noise at every step"):
        cli.run_verb("export", [*common, "sampler=ddpm", f"out={tmp_path}/q.ts.pt", f"run_dir={tmp_path}/exp2"])


def test_hybrid_image_import_matches_diffusion_policy_sampling(tmp_path):
    g = torch.Generator().manual_seed(0)
    fields = _fields_hybrid(g)
    cfg = _hybrid_cfg()
    meta = cfg["policy"]["shape_meta"]["obs"]
    torch.manual_seed(3)
    model = _shrink(R.DPHybridPolicy(meta, 2, 2, [84, 84], UNET, fields), 3)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.98)
    ckpt = _save_dp(tmp_path / "latest.ckpt", cfg, model, ema)
    sd = ema.state_dict()  # robomimic's VisualCore lists its backbone and pool twice (nets.0 / nets.1 aliases)
    assert "obs_encoder.obs_nets.image.backbone.nets.0.weight" in sd
    assert "obs_encoder.obs_nets.image.nets.0.nets.0.weight" in sd
    res = _import(ckpt, tmp_path / "out")
    assert res["policy_class"] == "DiffusionUnetHybridImagePolicy" and res["task"] == "pusht_image"
    policy = load_policy(tmp_path / "out" / "model.ckpt")
    assert policy.task_cfg["crop_shape"] == [84, 84] and policy.task_cfg["encoder"]["num_kp"] == 32
    gen = torch.Generator().manual_seed(12)
    obs = {"image": torch.rand(2, 2, 3, 96, 96, generator=gen), "agent_pos": torch.rand(2, 2, 2, generator=gen) * 512}
    ema.eval()
    for sampler, steps in (("ddpm", 100), ("ddim", 10)):
        diff, unclipped = _compare(policy, ema, obs, sampler, steps, seed=7)
        assert diff < 1e-5, (sampler, diff)
        assert unclipped > 0.5


# ----------------------------------------------------------------------------------------------------------------
# bad input: refused, naming the problem, before anything is written to out
def _refused(tmp_path, ckpt, match, *more):
    out = tmp_path / "out_refused"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _import(ckpt, out, *more)
    assert not out.exists() or not any(out.iterdir())


def test_not_a_dp_checkpoint(tmp_path):
    p = tmp_path / "weights.ckpt"
    torch.save({"weights": torch.zeros(3), "step": 1}, p)
    _refused(tmp_path, p, r"a dict with keys \['step', 'weights'\], not a Diffusion Policy checkpoint")
    txt = tmp_path / "notes.ckpt"
    txt.write_text("hello")
    _refused(tmp_path, txt, "not a readable torch checkpoint")
    _refused(tmp_path, tmp_path / "missing.ckpt", "no such file")


def test_unsupported_policy_class_and_settings(tmp_path, lowdim):
    model, ema = lowdim["model"], lowdim["ema"]
    cfg = _lowdim_cfg()
    cfg["policy"]["_target_"] = (
        "diffusion_policy.policy.diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy"
    )
    _refused(
        tmp_path, _save_dp(tmp_path / "t.ckpt", cfg, model, ema), "DiffusionTransformerLowdimPolicy is not supported"
    )
    cfg = _lowdim_cfg()
    cfg["policy"]["_target_"] = "diffusion_policy.policy.ibc_dfo_lowdim_policy.IbcDfoLowdimPolicy"
    _refused(tmp_path, _save_dp(tmp_path / "i.ckpt", cfg, model, ema), "IbcDfoLowdimPolicy is not supported")
    cfg = _lowdim_cfg(obs_as_global_cond=False)
    _refused(tmp_path, _save_dp(tmp_path / "inp.ckpt", cfg, model, ema), r"inpainting \(obs_as_global_cond=False\)")
    cfg = _lowdim_cfg()
    cfg["task"]["name"] = "kitchen_lowdim"
    _refused(tmp_path, _save_dp(tmp_path / "k.ckpt", cfg, model, ema), "task 'kitchen_lowdim' has no counterpart")


def test_observation_key_without_counterpart(tmp_path):
    meta = {
        "image": {"shape": [3, 96, 96], "type": "rgb"},
        "wrist_image": {"shape": [3, 96, 96], "type": "rgb"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    }
    tiny = torch.nn.Linear(1, 1)  # refused on the config, before any weight is read
    _refused(tmp_path, _save_dp(tmp_path / "w.ckpt", _hybrid_cfg(meta), tiny, tiny), "'wrist_image' .* no counterpart")


def test_entries_that_need_diffusion_policy_code(tmp_path, lowdim):
    # an object of a Diffusion Policy class, pickled by reference (its module faked for the writer only)
    names = ("diffusion_policy", "diffusion_policy.workspace", "diffusion_policy.workspace.base_workspace")
    fake = {n: types.ModuleType(n) for n in names}
    fake[names[0]].workspace, fake[names[1]].base_workspace = fake[names[1]], fake[names[2]]
    mod = fake[names[-1]]

    class BaseWorkspace:
        pass

    BaseWorkspace.__module__, BaseWorkspace.__qualname__ = mod.__name__, "BaseWorkspace"  # pickled by reference
    mod.BaseWorkspace = BaseWorkspace
    for n in names:
        assert n not in sys.modules
    sys.modules.update(fake)
    try:
        ws = BaseWorkspace()
        ws.epoch = 3
        ok = _save_dp(tmp_path / "extra.ckpt", _lowdim_cfg(), lowdim["model"], lowdim["ema"], {"workspace": ws})
        bad = _save_dp(tmp_path / "cfg.ckpt", _lowdim_cfg(), lowdim["model"], lowdim["ema"])
        payload = torch.load(bad, weights_only=False)
        payload["cfg"] = {"policy": ws}
        torch.save(payload, bad, pickle_module=PICKLER)
    finally:
        for n in names:
            del sys.modules[n]
    _refused(tmp_path, bad, r"entry 'cfg' needs \['diffusion_policy.workspace.base_workspace.BaseWorkspace'\]")
    res = _import(ok, tmp_path / "out_ok")  # the entry is skipped and named; the policy imports
    assert any(
        s.startswith("workspace: needs ['diffusion_policy.workspace.base_workspace.BaseWorkspace']")
        for s in res["skipped"]
    )
    # a class pickled by value (dill's _create_type) is refused the same way, never rebuilt
    ws_local = type("LocalThing", (), {})()
    byval = _save_dp(tmp_path / "byval.ckpt", {**_lowdim_cfg(), "extra": None}, lowdim["model"], lowdim["ema"])
    payload = torch.load(byval, weights_only=False)
    payload["cfg"] = {"policy": ws_local}
    torch.save(payload, byval, pickle_module=PICKLER)
    if PICKLER is not pickle:
        _refused(tmp_path, byval, r"entry 'cfg' needs \[\"dill._dill._create_type\('LocalThing'\)\"\]")


def test_existing_out_is_not_overwritten_without_overwrite(tmp_path, lowdim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=true"):
        _import(lowdim["ckpt"], out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    res = _import(lowdim["ckpt"], out, "overwrite=true")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "import.json", "keep.txt", "model.ckpt"]
    assert res["checkpoint"] == str(out / "model.ckpt")
    np.testing.assert_equal((out / "keep.txt").read_text(), "mine")


def test_feature_order_follows_shape_meta():
    """Diffusion Policy concatenates features in its shape_meta order (robomimic), which may interleave cameras and
    low-dim keys (Transport): the imported task keeps that order (task.obs_order) and the encoder follows it."""
    from shortcut_policy.commands.runner import compose
    from shortcut_policy.dp_import import DPCheckpoint, inspect_dp, project_task
    from shortcut_policy.nets.obs_encoders import ObsEncoder

    cams = ["shouldercamera0_image", "robot0_eye_in_hand_image", "shouldercamera1_image", "robot1_eye_in_hand_image"]
    low = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
    low1 = {k.replace("robot0", "robot1"): v for k, v in low.items()}
    meta = {cams[0]: {"shape": [3, 84, 84], "type": "rgb"}, cams[1]: {"shape": [3, 84, 84], "type": "rgb"}}
    meta |= {k: {"shape": [v]} for k, v in low.items()}
    meta |= {cams[2]: {"shape": [3, 84, 84], "type": "rgb"}, cams[3]: {"shape": [3, 84, 84], "type": "rgb"}}
    meta |= {k: {"shape": [v]} for k, v in low1.items()}
    cfg = _hybrid_cfg(meta, crop_shape=[76, 76])
    cfg["policy"]["shape_meta"]["action"] = {"shape": [20]}
    cfg["task"] = {"name": "transport_image", "abs_action": True, "env_runner": {"max_steps": 700}}
    spec = inspect_dp(DPCheckpoint("x.ckpt", OmegaConf.to_container(OmegaConf.create(cfg)), {}))
    base = OmegaConf.to_container(compose("train", ["task=transport_image"]).task, resolve=True)
    task = project_task(spec, base)
    assert task["obs_order"] == list(meta) and task["image_keys"] == cams and task["max_steps"] == 700
    assert task["crop_shape"] == [76, 76] and task["action_dim"] == 20
    # the encoder concatenates per step in that order: low-dim features sit between the cameras' features
    shapes = {"a": [3, 32, 32], "p": [2], "b": [3, 32, 32]}
    enc = ObsEncoder(shapes, ["p"], ["a", "b"], 2, feature_dim=4, resnet_width=16, obs_order=["a", "p", "b"]).eval()
    obs = {
        "a": torch.rand(1, 2, 3, 32, 32),
        "p": torch.tensor([[[7.0, 8.0], [9.0, 10.0]]]),
        "b": torch.rand(1, 2, 3, 32, 32),
    }
    out = enc(obs).reshape(1, 2, 10)
    assert torch.equal(out[0, :, 4:6], obs["p"][0])
    with pytest.raises(ValueError, match="obs_order"):
        ObsEncoder(shapes, ["p"], ["a", "b"], 2, obs_order=["a", "b"])
