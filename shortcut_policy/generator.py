"""Image generator: a net (DiT) + an objective (+ a VAE for latent space); sampled by ``shortcut-policy sample``.

``ImageGenerator.forward(batch, teacher=None) = compute_loss``: the trainer's model contract. Batches are
``{"x": (B, C, H, W) latents or pixels in [-1, 1], "label": (B,) long}``. Class-conditional tasks use labels
0..num_classes-1 and the null label ``num_classes`` (class dropout and guidance live in the objective);
unconditional tasks (CelebA-HQ) map every label to the null label, as the reference does
(kvfrans/shortcut-models train.py:214).

The VAE is held outside the module tree: it is frozen, not saved in checkpoints (it is reloaded from
``task.vae_path``), not averaged by the EMA, and not wrapped by DDP. It is loaded on first use.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from .checkpoint import load_checkpoint
from .conventions import VAE_LATENT_SCALE
from .datasets.latents import decode as vae_decode
from .datasets.latents import encode, load_vae
from .model import TrainableModel
from .nets import build_net
from .objectives import build_objective
from .objectives.distillation import FrozenTeacher


class _Shared:
    """Holds an object that copy.deepcopy (the EMA copy of the model) must share, not copy."""

    def __init__(self, obj=None):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class ImageGenerator(TrainableModel):
    """Class-conditional or unconditional image model: a DiT ``net`` and an ``objective`` over pixels in [-1, 1] or
    VAE latents (``space="latent"``: scaled by ``latent_scale``, the VAE loaded lazily from ``vae_path``).

    ``num_classes`` real classes, label ``num_classes`` is the null label (every label becomes it when
    ``class_conditional`` is false). ``encode_online`` encodes pixel batches with the VAE at each step (no latents
    store), sampling the posterior when ``latent_sample``. Raises ``ValueError`` for an unknown ``space``."""

    def __init__(
        self,
        net: nn.Module,
        objective,
        vae=None,
        num_classes: int = 1,
        class_conditional: bool = True,
        image_size: int = 256,
        image_channels: int = 3,
        space: str = "pixel",
        vae_path=None,
        latent_scale: float = VAE_LATENT_SCALE,
        encode_online: bool = False,
        latent_sample: bool = True,
    ):
        super().__init__()
        if space not in ("pixel", "latent"):
            raise ValueError(f"space={space!r}: expected pixel or latent")
        self.net, self.objective = net, objective
        self.num_classes, self.class_conditional = int(num_classes), bool(class_conditional)
        self.null_label = self.num_classes
        self.image_size, self.image_channels, self.space = int(image_size), int(image_channels), space
        self.latent_scale, self.encode_online, self.latent_sample = (
            float(latent_scale),
            bool(encode_online),
            bool(latent_sample),
        )
        self._vae = _Shared(vae)
        self.vae_path = vae_path
        self.x_shape = (int(net.in_channels), *net.input_size)

    # --- VAE ------------------------------------------------------------------------------------------
    @property
    def vae(self):
        if self.space != "latent":
            return None
        if self._vae.obj is None:
            if not self.vae_path:
                raise ValueError("latent-space generator without a VAE: set task.vae_path")
            self._vae.obj = load_vae(self.vae_path, self.device)
        vae = self._vae.obj
        C, h, w = self.x_shape
        ds = 2 ** (len(vae.config.block_out_channels) - 1)
        if vae.config.latent_channels != C or self.image_size // ds != h:
            raise ValueError(
                f"the VAE in {self.vae_path} makes {vae.config.latent_channels}x{self.image_size // ds}"
                f" latents for {self.image_size}px images, the net expects {C}x{h}x{w}: check "
                "task.latent_channels / task.latent_downsample"
            )
        if next(vae.parameters()).device != self.device:
            vae.to(self.device)
        return vae

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def max_steps(self) -> int:
        return int(self.objective.m)

    # --- training ---------------------------------------------------------------------------------------
    def labels_for(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B,) for the net: the null label everywhere for an unconditional model, else the labels themselves
        (raises ``ValueError`` outside 0..num_classes)."""
        labels = labels.long().reshape(-1)
        if not self.class_conditional:
            return torch.full_like(labels, self.null_label)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(
                f"labels must be in 0..{self.num_classes} ({self.num_classes} = null), got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        return labels

    def prepare(self, batch: dict) -> torch.Tensor:
        """The net's input x (B, C, h, w) from a batch: the batch's ``x`` (pixels or stored latents), or its VAE
        encoding when ``encode_online``. Raises ``ValueError`` when the shape differs from the net's."""
        x = batch["x"]
        if self.encode_online:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                mean, std = encode(self.vae, x.float(), self.latent_scale)
                x = mean + std * torch.randn_like(std) if self.latent_sample else mean
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"batch x has shape {tuple(x.shape[1:])}, the net expects {self.x_shape}")
        return x

    def compute_loss(self, batch: dict, teacher=None, frozen: "ImageGenerator | None" = None):
        """Training loss on ``batch`` = {"x": (B, C, H, W), "label": (B,)}: the objective's loss with the null
        label for classifier-free guidance (conditional models). ``teacher``: the EMA generator or net; ``frozen``: a
        trained teacher generator (distillation objectives), passed on as a
        :class:`~shortcut_policy.objectives.distillation.FrozenTeacher` with the same labels. Returns
        ``(loss, info)``."""
        x = self.prepare(batch)
        labels = self.labels_for(batch["label"].to(x.device))
        if isinstance(teacher, ImageGenerator):
            teacher = teacher.net
        null = self.null_label if self.class_conditional else None
        if frozen is None:
            return self.objective.loss(self.net, x, labels, teacher=teacher, null_cond=null)
        ft = FrozenTeacher(frozen.net, labels, frozen.objective)
        return self.objective.loss(self.net, x, labels, teacher=teacher, null_cond=null, frozen=ft)

    @classmethod
    def load_teacher(cls, path, like: "ImageGenerator") -> "ImageGenerator":
        """A trained image model to distil from (:func:`load_generator`, evaluation weights), checked against the
        student ``like``: same latent/image shape and number of classes. Raises ``ValueError`` naming what
        differs."""
        teacher, _ = load_generator(path)
        for what, a, b in (
            ("sample shape", teacher.x_shape, like.x_shape),
            ("class conditioning", teacher.class_conditional, like.class_conditional),
        ):
            if a != b:
                raise ValueError(f"teacher checkpoint {path}: its {what} {a} differs from this run's {b}")
        return teacher

    # --- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels,
        steps: int,
        noise: torch.Tensor | None = None,
        cfg_scale=None,
        decode: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] (decoded when latent) from ``noise`` (or fresh N(0, I)).

        ``cfg_scale=None`` uses the objective's; the shortcut objective applies guidance only at steps = M."""
        dev = self.device
        labels = torch.as_tensor(labels, device=dev).long().reshape(-1)
        B = labels.shape[0]
        if noise is None:
            noise = torch.randn((B, *self.x_shape), generator=generator)
        noise = noise.to(dev)
        cond = self.labels_for(labels)
        null = self.null_label if self.class_conditional else None
        was_training = self.training
        self.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            x = self.objective.sample(self.net, noise, cond, steps=steps, null_cond=null, cfg_scale=cfg_scale)
        x = x.float()
        if self.space == "latent" and decode:
            x = vae_decode(self.vae, x, self.latent_scale)
        self.train(was_training)
        return x.clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------------
# Construction from a config (the model's own; datasets and the training bundle: shortcut_policy.builders)


def generator_dims(task) -> tuple[int, int]:
    """(in_channels, input_size) of the net for a task config."""
    size, space = int(task.image_size), task.get("space", "pixel")
    if space == "latent":
        ds = int(task.get("latent_downsample", 8))
        if size % ds:
            raise ValueError(f"image_size={size} not divisible by the VAE downsampling factor {ds}")
        return int(task.get("latent_channels", 4)), size // ds
    return int(task.get("image_channels", 3)), size


def build_generator(cfg, vae=None) -> ImageGenerator:
    """An :class:`ImageGenerator` from a resolved config (task, net, objective); the net's input size and channels
    follow the task (:func:`generator_dims`). ``vae``: an already loaded VAE to share."""
    task = cfg.task
    channels, size = generator_dims(task)
    objective = build_objective(cfg.objective)
    net = build_net(
        cfg.net,
        **objective.net_options(),
        input_size=size,
        in_channels=channels,
        num_classes=int(task.num_classes),
    )
    if hasattr(objective, "bind_net"):  # score_distillation trains a second net shaped like the model's
        objective.bind_net(net)
    space = task.get("space", "pixel")
    return ImageGenerator(
        net,
        objective,
        vae=vae,
        num_classes=int(task.num_classes),
        class_conditional=bool(task.class_conditional),
        image_size=int(task.image_size),
        image_channels=int(task.get("image_channels", 3)),
        space=space,
        vae_path=task.get("vae_path"),
        latent_scale=float(task.get("latent_scale", VAE_LATENT_SCALE)),
        encode_online=space == "latent" and not task.get("latents_path"),
        latent_sample=bool(task.get("latent_sample", True)),
    )


# ------------------------------------------------------------------------------------------------------------
# Checkpoints -> generator, sampling helpers (the `sample` verb: shortcut_policy.commands.sample)


def load_generator(path, device="cpu", weights: str = "auto"):
    """(ImageGenerator with the checkpoint's weights, its config). weights: auto (train.eval_model) | ema | online."""
    ck = load_checkpoint(path, map_location="cpu")
    cfg = OmegaConf.create(ck["cfg"])
    if cfg.get("task", {}).get("kind") != "image":
        raise ValueError(f"checkpoint {path} is not an image model (task.kind={cfg.get('task', {}).get('kind')!r})")
    if weights in (None, "auto"):
        weights = cfg.get("train", {}).get("eval_model", "ema")
    if weights not in ("ema", "online"):
        raise ValueError(f"weights={weights!r}: expected auto, ema or online")
    gen = build_generator(cfg)
    state = ck["ema"]["model"] if weights == "ema" else ck["model"]
    gen.load_state_dict(state)
    return gen.to(device).eval(), cfg


def default_labels(gen: ImageGenerator, n: int, seed: int = 0) -> torch.Tensor:
    """n labels for sampling: zeros for an unconditional model, else uniform over the classes from a generator seeded
    with ``seed``."""
    if not gen.class_conditional:
        return torch.zeros(n, dtype=torch.long)
    return torch.randint(0, gen.num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def sample_images(
    gen: ImageGenerator,
    n: int,
    steps: int,
    seed: int = 0,
    labels=None,
    cfg_scale=None,
    batch_size: int = 64,
    device=None,
) -> torch.Tensor:
    """n images on the CPU from fixed noise (seeded per batch): the same seed gives the same noise for every N."""
    labels = default_labels(gen, n, seed) if labels is None else torch.as_tensor(labels).long()
    out = []
    for i, b0 in enumerate(range(0, n, batch_size)):
        b1 = min(n, b0 + batch_size)
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        noise = torch.randn((b1 - b0, *gen.x_shape), generator=g)
        out.append(gen.sample(labels[b0:b1], steps, noise=noise, cfg_scale=cfg_scale).cpu())
    return torch.cat(out)
