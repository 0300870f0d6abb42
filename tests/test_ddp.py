"""DDP (gloo, 2 CPU processes) gives the same loss and parameter update as one process on the same global batch.

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

    obj = {"name": "shortcut", "m": 128, "bootstrap_fraction": 0.25, "level_allocation": "cycle", "clip": 4.0,
           "teacher": "ema", "class_dropout_prob": 0.2, "bootstrap_cfg": True, "cfg_scale": 1.5}
    if objective == "flow_matching":
        obj = {"name": "flow_matching", "m": 128, "t_sampling": "discrete", "class_dropout_prob": 0.2}
    return OmegaConf.create({
        "task": {"name": "digits", "kind": "image", "source": "digits", "class_conditional": True, "num_classes": 10,
                 "image_size": 16, "image_channels": 1, "space": "pixel", "random_flip": False},
        "net": {"kind": "dit", "hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4},
        "objective": obj, "logger": {"kind": "none"},
        "train": {"seed": SEED, "device": "cpu", "num_steps": 1, "batch_size": WORLD * B_LOCAL, "lr": 1e-3,
                  "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "lr_schedule": "constant",
                  "warmup_steps": 0, "grad_clip": None, "ema": {"decay": 0.999, "warmup": "power", "power": 0.75,
                                                               "inv_gamma": 1.0},
                  "eval_model": "ema", "log_every": 1, "eval_every": 0, "checkpoint_every": 1000, "topk": 0,
                  "topk_key": "score", "resume": False, "num_workers": 0, "amp": "auto", "max_minutes": None},
    })


def _global_batch():
    from shortcut_policy.datasets.images import DigitsDataset

    ds = DigitsDataset(16, "train")
    return {"x": ds.x[: WORLD * B_LOCAL].clone(), "label": ds.labels[: WORLD * B_LOCAL].clone()}


def _half(batch, r):
    return {k: v[r * B_LOCAL: (r + 1) * B_LOCAL] for k, v in batch.items()}


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from shortcut_policy.generator import build_generator
    from shortcut_policy.objectives.timesteps import allocate_levels, global_levels_for_rank
    from shortcut_policy.train.trainer import Trainer

    out = {}
    batch = _global_batch()
    for name in ("shortcut", "flow_matching"):
        cfg = _cfg(name)
        torch.manual_seed(0)
        model = build_generator(cfg)
        trainer = Trainer(model, cfg, os.path.join(outdir, f"{name}{rank}"), batches=iter([_half(batch, rank)]),
                          progress=False)
        assert trainer.world == WORLD and trainer.rank == rank
        info = trainer.train_step(next(trainer.batches))
        out[name] = {"loss": info["loss"], "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
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
    from shortcut_policy.generator import build_generator
    from shortcut_policy.train.ema import EMA
    from shortcut_policy.train.trainer import seed_everything

    cfg = _cfg(name)
    torch.manual_seed(0)
    model = build_generator(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    teacher = EMA(model, decay=0.999).model  # the EMA copy at step 0, as the trainer's teacher
    model.train()
    batch, losses = _global_batch(), []
    opt.zero_grad()
    for r in range(WORLD):
        seed_everything(SEED + r)
        loss, _ = model(_half(batch, r), teacher=teacher)
        (loss / WORLD).backward()
        losses.append(loss.item())
    opt.step()
    return losses, model.state_dict()


@pytest.mark.timeout(300)
def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(r["levels_ok"] for r in ranks)
    assert ranks[0]["levels_cover"] == list(range(7))  # 14 global rows cover all 7 levels; 7 per rank alone would not
    for name in ("shortcut", "flow_matching"):
        ref_losses, ref_state = _reference(name)
        for r in range(WORLD):
            assert ranks[r][name]["loss"] == pytest.approx(ref_losses[r], rel=1e-5, abs=1e-6)
        moved = 0.0
        for k, v in ref_state.items():
            for r in range(WORLD):  # every rank holds the same, averaged update
                torch.testing.assert_close(ranks[r][name]["state"][k], v, atol=2e-6, rtol=1e-5, msg=f"{name} {k}")
            moved = max(moved, (v - _init_state(name)[k]).abs().max().item())
        assert moved > 1e-4  # the step did move the weights


_INIT = {}


def _init_state(name):
    if name not in _INIT:
        from shortcut_policy.generator import build_generator

        torch.manual_seed(0)
        _INIT[name] = build_generator(_cfg(name)).state_dict()
    return _INIT[name]
