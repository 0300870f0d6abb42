"""Shared test settings: the tiny Push-T-sized U-Net and trainer overrides that CLI tests train with."""


def tiny_train(batch_size: int = 8, warmup_steps: int = 1) -> list[str]:
    """Hydra overrides for a few-second CPU training run: a 2-level U-Net (16/32 channels), no logger, no rollout
    evaluations, a loss row every step."""
    return [
        "net=unet1d_small",
        "net.down_dims=[16,32]",
        "net.step_embed_dim=16",
        "logger=none",
        f"train.batch_size={batch_size}",
        "train.eval_every=0",
        "train.log_every=1",
        f"train.warmup_steps={warmup_steps}",
    ]
