"""DDP (gloo, 2 CPU processes) gives the same loss and parameter update as one process on the same global batch,
for an image task (DiT; shortcut and flow matching) and a policy task (UNet1D + low-dim observations; shortcut).

Each objective draws its noise / t / class dropout per row from the process's RNG, so the single-process reference
processes the global batch as the two per-rank halves (same seeds as the ranks: the trainer seeds rank r with
seed + r) and averages their gradients before one AdamW step: the loss and update of the global batch. For the
shortcut objective the step levels are stratified over the GLOBAL bootstrap batch; with
``level_allocation=cycle`` and 7 bootstrap rows per rank each rank's slice is the same as a single process's
allocation of 7 rows, which makes the reference exact. The workers also check that with the reference allocation
the ranks' level slices concatenate to the global allocation (pitfall 4: per-rank allocation would put every
bootstrap row at d=1 for small per-rank batches).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD, B_LOCAL, SEED = 2, 28, 123


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(objective: str):
    from omegaconf import OmegaConf

    obj = {
        "name": "shortcut",
        "m": 128,
        "bootstrap_fraction": 0.25,
        "level_allocation": "cycle",
        "clip": 4.0,
        "teacher": "ema",
        "class_dropout_prob": 0.2,
        "bootstrap_cfg": True,
        "cfg_scale": 1.5,
    }
    if objective == "flow_matching":
        obj = {"name": "flow_matching", "m": 128, "t_sampling": "discrete", "class_dropout_prob": 0.2}
    return OmegaConf.create(
        {
            "task": {
                "name": "digits",
                "kind": "image",
                "source": "digits",
                "class_conditional": True,
                "num_classes": 10,
                "image_size": 16,
                "image_channels": 1,
                "space": "pixel",
                "random_flip": False,
            },
            "net": {"kind": "dit", "hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4},
            "objective": obj,
            "logger": {"kind": "none"},
            "train": {
                "seed": SEED,
                "device": "cpu",
                "num_steps": 1,
                "batch_size": WORLD * B_LOCAL,
                "lr": 1e-3,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": 0.1,
                "lr_schedule": "constant",
                "warmup_steps": 0,
                "grad_clip": None,
                "ema": {"decay": 0.999, "warmup": "power", "power": 0.75, "inv_gamma": 1.0},
                "eval_model": "ema",
                "log_every": 1,
                "eval_every": 0,
                "checkpoint_every": 1000,
                "topk": 0,
                "topk_key": "score",
                "resume": False,
                "num_workers": 0,
                "amp": "auto",
                "max_minutes": None,
            },
        }
    )


def _policy_cfg():
    from omegaconf import OmegaConf

    cfg = _cfg("shortcut")
    cfg.task = {
        "name": "lowdim_ddp",
        "kind": "policy",
        "obs_shapes": {"obs": [20]},
        "lowdim_keys": ["obs"],
        "image_keys": [],
        "horizon": 16,
        "n_obs_steps": 2,
        "n_action_steps": 8,
        "action_dim": 2,
    }
    cfg.net = OmegaConf.create(
        {
            "kind": "unet1d",
            "step_embed_dim": 32,
            "down_dims": [16, 32],
            "kernel_size": 5,
            "n_groups": 4,
            "cond_predict_scale": True,
            "use_step_size": True,
            "time_scale": 100.0,
        }
    )
    cfg.objective.class_dropout_prob = 0.0
    cfg.objective.bootstrap_cfg = False
    return cfg


def _meanflow_cfg():
    """The policy task with objective=meanflow: its JVP target must not bypass DDP's gradient synchronisation."""
    cfg = _policy_cfg()
    cfg.objective = {
        "name": "meanflow",
        "m": 128,
        "flow_fraction": 0.5,
        "time_dist": "logit_normal",
        "logit_mean": 0.4,
        "logit_std": 1.0,
        "adaptive_p": 1.0,
        "adaptive_c": 1e-3,
        "jvp": "autograd",
    }
    return cfg


def _cfg_of(name):
    return {"policy": _policy_cfg, "meanflow": _meanflow_cfg}.get(name, lambda: _cfg(name))()


def _build(name):
    """(model, global batch) for 'shortcut' / 'flow_matching' (image DiT on digits), 'policy' (UNet1D, shortcut) or
    'meanflow' (UNet1D, MeanFlow)."""
    torch.manual_seed(0)
    if name in ("policy", "meanflow"):
        from shortcut_policy.datasets.normalizer import LinearNormalizer
        from shortcut_policy.policy import build_policy

        g = torch.Generator().manual_seed(1)
        obs = torch.randn(WORLD * B_LOCAL, 2, 20, generator=g) * 3 + 1
        action = torch.rand(WORLD * B_LOCAL, 16, 2, generator=g) * 500
        norm = LinearNormalizer().fit({"obs": obs.reshape(-1, 20), "action": action.reshape(-1, 2)})
        torch.manual_seed(0)
        return build_policy(_cfg_of(name), norm), {"obs": {"obs": obs}, "action": action}
    from shortcut_policy.datasets.images import DigitsDataset
    from shortcut_policy.generator import build_generator

    ds = DigitsDataset(16, "train")
    model = build_generator(_cfg(name))
    return model, {"x": ds.x[: WORLD * B_LOCAL].clone(), "label": ds.labels[: WORLD * B_LOCAL].clone()}


def _half(batch, r):
    if isinstance(batch, dict):
        return {k: _half(v, r) for k, v in batch.items()}
    return batch[r * B_LOCAL : (r + 1) * B_LOCAL]


NAMES = ("shortcut", "flow_matching", "policy", "meanflow")


def _worker(rank, port, outdir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from shortcut_policy.objectives.timesteps import allocate_levels, global_levels_for_rank
    from shortcut_policy.train.trainer import Trainer

    out = {}
    for name in NAMES:
        try:
            cfg = _cfg_of(name)
            model, batch = _build(name)
            trainer = Trainer(
                model, cfg, os.path.join(outdir, f"{name}{rank}"), batches=iter([_half(batch, rank)]), progress=False
            )
            assert trainer.world == WORLD and trainer.rank == rank
            info = trainer.train_step(next(trainer.batches))
            out[name] = {"loss": info["loss"], "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        except Exception as e:  # reported by the test of that model; the other models still run
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    # the reference allocation over the global bootstrap batch (7 rows per rank)
    mine = global_levels_for_rank(7, 7, "reference")
    gathered = [torch.zeros_like(mine) for _ in range(WORLD)]
    dist.all_gather(gathered, mine)
    out["levels_ok"] = bool(torch.equal(torch.cat(gathered), allocate_levels(14, 7, "reference")))
    out["levels_cover"] = sorted(set(torch.cat(gathered).tolist()))
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _reference(name):
    from shortcut_policy.train.ema import EMA
    from shortcut_policy.train.trainer import seed_everything

    cfg = _cfg_of(name)
    model, batch = _build(name)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    teacher = EMA(model, decay=0.999).model  # the EMA copy at step 0, as the trainer's teacher
    model.train()
    losses = []
    opt.zero_grad()
    for r in range(WORLD):
        seed_everything(SEED + r)
        loss, _ = model(_half(batch, r), teacher=teacher)
        (loss / WORLD).backward()
        losses.append(loss.item())
    opt.step()
    return losses, model.state_dict(), init


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check_same_as_single_process(ranks, name):
    for r in range(WORLD):
        assert "error" not in ranks[r][name], ranks[r][name].get("error")
    ref_losses, ref_state, init = _reference(name)
    for r in range(WORLD):
        assert ranks[r][name]["loss"] == pytest.approx(ref_losses[r], rel=1e-5, abs=1e-6)
    moved = 0.0
    for k, v in ref_state.items():
        for r in range(WORLD):  # every rank holds the same, averaged update
            torch.testing.assert_close(ranks[r][name]["state"][k], v, atol=2e-6, rtol=1e-5, msg=f"{name} {k}")
        if v.is_floating_point():
            moved = max(moved, (v - init[k]).abs().max().item())
    assert moved > 1e-4  # the step did move the weights


@pytest.mark.timeout(300)
def test_ddp_image_matches_single_process(ddp_results):
    assert all(r["levels_ok"] for r in ddp_results)
    assert ddp_results[0]["levels_cover"] == list(range(7))  # 14 global rows cover all 7 levels
    for name in ("shortcut", "flow_matching"):
        _check_same_as_single_process(ddp_results, name)


def _normalizer_breaks_module_to() -> bool:
    """datasets/normalizer.py's LinearNormalizer._apply(x, forward) shadows nn.Module._apply(fn), so .to() fails."""
    import inspect

    from shortcut_policy.datasets.normalizer import LinearNormalizer

    return "forward" in inspect.signature(LinearNormalizer._apply).parameters


@pytest.mark.timeout(300)
def test_ddp_policy_matches_single_process(ddp_results):
    if _normalizer_breaks_module_to():
        pytest.xfail(
            "LinearNormalizer._apply shadows nn.Module._apply: Policy.to(device) raises (datasets/normalizer.py)"
        )
    _check_same_as_single_process(ddp_results, "policy")


@pytest.mark.timeout(300)
def test_ddp_meanflow_jvp_matches_single_process(ddp_results):
    """MeanFlow's JVP target inside DDP: same loss per rank and the same averaged update as one process."""
    if _normalizer_breaks_module_to():
        pytest.xfail(
            "LinearNormalizer._apply shadows nn.Module._apply: Policy.to(device) raises (datasets/normalizer.py)"
        )
    _check_same_as_single_process(ddp_results, "meanflow")
