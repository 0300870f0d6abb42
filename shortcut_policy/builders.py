"""Builders: from a (composed, resolved) config to what a command runs. The one place that knows how a config
becomes a dataset, a model, an evaluator and the training bundle of each task kind.

* datasets:   :func:`build_dataset` (policy tasks: windows of a zarr / robomimic hdf5 replay buffer),
              :func:`build_image_dataset` (image tasks: latent/pixel store, image folder, digits);
* models:     :func:`build_policy` / :func:`load_policy` (shortcut_policy.policy), :func:`build_generator` /
              :func:`load_generator` (shortcut_policy.generator), re-exported here: each model module keeps the
              constructor its checkpoint loader needs;
* evaluators: :class:`RolloutEvaluator` (the trainer's periodic rollouts, through the env registry);
* training:   :func:`build_training` -> (model, train dataset, validation dataset, evaluator) by ``task.kind``
              (:func:`build_policy_training`, :func:`build_image_training`).

Commands (:mod:`shortcut_policy.commands`) call these; library modules never import commands or the CLI.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .conventions import TEST_SEED_START
from .datasets.images import DigitsDataset, ImageFolderDataset
from .datasets.latents import LatentDataset
from .datasets.lerobot import LeRobotSource, converted_lerobot_meta, lerobot_obs_keys
from .datasets.robomimic import replay_buffer_from_hdf5
from .datasets.zarr_dataset import SequenceDataset
from .eval.rollout import evaluate
from .generator import build_generator, generator_dims, load_generator
from .policy import build_policy, load_policy
from .utils import to_plain

__all__ = [
    "build_dataset",
    "build_image_dataset",
    "build_policy",
    "load_policy",
    "build_generator",
    "load_generator",
    "RolloutEvaluator",
    "build_policy_training",
    "build_image_training",
    "build_training",
]


# ---------------------------------------------------------------------------------------------------------
# datasets
def build_dataset(cfg, split: str = "train") -> SequenceDataset:
    """The window dataset of a policy task (``task.dataset``: a zarr replay buffer, a robomimic hdf5 read directly,
    or a LeRobot folder ``lerobot_path`` read directly); its observation shapes and action dim must match the task's.

    LeRobot data (a folder, or a zarr written by ``shortcut-policy convert``) is mapped onto the task's observation
    fields by LeRobot's feature names (:func:`~shortcut_policy.datasets.lerobot.lerobot_obs_keys`), or by
    ``task.dataset.lerobot_obs_keys`` when set; its fps must equal ``task.control_hz``."""
    task = to_plain(cfg["task"])
    dcfg = dict(task["dataset"])
    hdf5 = dcfg.pop("hdf5_path", None)
    filter_key = dcfg.pop("hdf5_filter_key", None)
    zarr_path = dcfg.pop("zarr_path", None)
    lerobot = dcfg.pop("lerobot_path", None)
    lerobot_keys = dcfg.pop("lerobot_obs_keys", None)
    if lerobot:
        path = Path(lerobot)
        if not path.is_dir():
            raise FileNotFoundError(
                f"task.dataset.lerobot_path={str(path)!r}: no such folder (a local LeRobot dataset: meta/info.json, "
                "meta/episodes/, data/, videos/)"
            )
        src = LeRobotSource(path)
        _map_lerobot(dcfg, task, src.features, src.fps, lerobot_keys, path)
        source = {"replay_buffer": src}
    else:
        path = Path(hdf5 or zarr_path or "")
        if not (hdf5 or zarr_path) or not path.exists():
            key = "hdf5_path" if hdf5 else "zarr_path"
            raise FileNotFoundError(
                f"task.dataset.{key}={str(path)!r}: no such dataset. Generate demonstrations with "
                f"`shortcut-policy demos task={task.get('env', '?')} out=...` or point {key} at a file"
            )
        source = {"zarr_path": path}
        if hdf5:  # a robomimic hdf5 (official layout) read directly, no conversion by hand
            source = {
                "replay_buffer": replay_buffer_from_hdf5(
                    path, dcfg["obs_keys"], bool(task.get("abs_action", False)), dcfg.get("image_keys", ()), filter_key
                )
            }
        else:
            meta = converted_lerobot_meta(path)  # a zarr written by `shortcut-policy convert`
            if meta is not None:
                _map_lerobot(dcfg, task, meta.get("features", {}), float(meta["fps"]), lerobot_keys, path)
    ds = SequenceDataset(
        **source,
        horizon=task["horizon"],
        n_obs_steps=task["n_obs_steps"],
        n_action_steps=task["n_action_steps"],
        split=split,
        **dcfg,
    )
    shapes = {k: tuple(v) for k, v in ds.obs_shapes.items()}
    want = {k: tuple(v) for k, v in task["obs_shapes"].items()}
    if shapes != want:
        raise ValueError(f"{path}: dataset observation shapes {shapes} do not match task.obs_shapes {want}")
    if ds.action_dim != task["action_dim"]:
        raise ValueError(
            f"{path}: dataset action dim {ds.action_dim} does not match task.action_dim={task['action_dim']}"
        )
    return ds


def _map_lerobot(dcfg: dict, task: dict, features, fps: float, explicit, path) -> None:
    """Point ``dcfg["obs_keys"]`` at LeRobot features (``explicit`` {field: feature(s)} or by name) and check the
    data's fps against ``task.control_hz`` (ValueError naming both)."""
    hz = task.get("control_hz")
    if hz is not None and abs(float(hz) - float(fps)) > 1e-6:
        raise ValueError(
            f"{path}: the data was recorded at {fps:g} fps (meta/info.json), but the task runs at "
            f"task.control_hz={hz}; set task.control_hz={fps:g} so that the policy's action chunks keep the data's "
            "timing"
        )
    if explicit:
        dcfg["obs_keys"] = {k: ([v] if isinstance(v, str) else list(v)) for k, v in dict(explicit).items()}
    else:
        dcfg["obs_keys"] = lerobot_obs_keys(
            features, list(dcfg["obs_keys"]), list(dcfg.get("image_keys") or []), str(path)
        )


def build_image_dataset(cfg, split: str | None = None):
    """The training dataset of an image task: a latent/pixel zarr store, an image folder, or digits."""
    task = cfg.task
    source, space = task.get("source", "folder"), task.get("space", "pixel")
    channels, size = generator_dims(task)
    if source == "digits":
        if space != "pixel":
            raise ValueError("the digits task is pixel-space only")
        return DigitsDataset(
            int(task.image_size), split or task.get("split", "train"), bool(task.get("random_flip", False))
        )
    if source != "folder":
        raise ValueError(f"task.source={source!r}: expected folder or digits")
    store = task.get("latents_path")
    if store:
        if not Path(str(store)).exists():
            raise FileNotFoundError(
                f"{store} (task.latents_path) not found: encode the dataset first with "
                f"`shortcut-policy latents task={task.get('name', '<task>')}`, or set task.latents_path=null to "
                "encode online every step"
            )
        ds = LatentDataset(
            store, sample=bool(task.get("latent_sample", True)), random_flip=bool(task.get("random_flip", True))
        )
        if ds.space != space or tuple(ds.shape) != (channels, size, size):
            raise ValueError(
                f"{store} holds {ds.space} items of shape {tuple(ds.shape)}, the task expects {space} "
                f"{(channels, size, size)}"
            )
        if task.class_conditional and ds.num_classes != int(task.num_classes):
            raise ValueError(f"{store} has {ds.num_classes} classes, task.num_classes={task.num_classes}")
        return ds
    ds = ImageFolderDataset(
        task.data_dir,
        int(task.image_size),
        bool(task.class_conditional),
        random_flip=bool(task.get("random_flip", True)),
        channels=int(task.get("image_channels", 3)),
    )
    if task.class_conditional and ds.num_classes != int(task.num_classes):
        raise ValueError(f"{task.data_dir} has {ds.num_classes} class folders, task.num_classes={task.num_classes}")
    return ds


# ---------------------------------------------------------------------------------------------------------
# evaluators and training bundles
class RolloutEvaluator:
    """Periodic rollout evaluation during training (EMA weights, `steps` sampling steps).

    ``n_action_steps`` (int or None) executes that many actions of each chunk during these rollouts instead of the
    trained action horizon, and ``warm_start`` (tau or None) starts every chunk after an episode's first at t = tau
    from the previous one (``eval warm_start=``): checkpoints are then chosen by the setting they will be deployed
    with (``train.eval_n_action_steps``, ``train.eval_warm_start``). Both are set on the policy only for the
    rollouts and restored afterwards; invalid values raise ``ValueError`` naming the config key when the trainer is
    built (:func:`build_policy_training`)."""

    def __init__(
        self,
        task_cfg,
        n_episodes: int,
        seed_start: int,
        steps: int = 1,
        run_dir=None,
        n_workers=None,
        envs_per_worker=None,
        n_action_steps: int | None = None,
        warm_start: float | None = None,
    ):
        self.task_cfg, self.n_episodes, self.seed_start, self.steps = task_cfg, n_episodes, seed_start, steps
        self.run_dir, self.n_workers, self.envs_per_worker = run_dir, n_workers, envs_per_worker
        self.n_action_steps, self.warm_start = n_action_steps, warm_start

    def check(self, policy) -> None:
        """Validate ``n_action_steps`` / ``warm_start`` against ``policy`` (horizon, objective's start times) before
        training starts; ``ValueError`` naming ``train.eval_n_action_steps`` / ``train.eval_warm_start``."""
        with self._settings(policy):
            pass

    @contextlib.contextmanager
    def _settings(self, policy):
        saved = (policy.n_action_steps, policy.warm_start)
        try:
            if self.n_action_steps is not None:
                policy.set_execution_horizon(self.n_action_steps, "train.eval_n_action_steps")
            try:
                policy.warm_start = policy.check_warm_start(self.warm_start, self.steps)
            except ValueError as e:
                raise ValueError(f"train.eval_{e}") from None
            yield
        finally:
            policy.n_action_steps, policy.warm_start = saved

    def __call__(self, policy, step: int) -> dict:
        task_cfg = self.task_cfg
        if self.n_action_steps is not None:
            task_cfg = {**to_plain(task_cfg), "n_action_steps": int(self.n_action_steps)}
        with self._settings(policy):
            res = evaluate(
                task_cfg,
                policy=policy,
                steps_list=[self.steps],
                n_episodes=self.n_episodes,
                seed_start=self.seed_start,
                n_workers=self.n_workers,
                progress=False,
                envs_per_worker=self.envs_per_worker,
            )
        n = self.steps
        stages = {
            f"stage/{k}": v for k, v in (res.get(f"stage_rate@{n}") or {}).items()
        }  # Transport: how far episodes get
        return {
            "test_mean_score": res[f"mean_score@{n}"],
            "test_success_rate": res[f"success_rate@{n}"],
            "seed_start": self.seed_start,
            "n_episodes": self.n_episodes,
            **({"n_action_steps": int(self.n_action_steps)} if self.n_action_steps is not None else {}),
            **({"warm_start": float(self.warm_start)} if self.warm_start is not None else {}),
            **stages,
        }


def build_policy_training(cfg, run_dir):
    """(policy, train dataset, validation dataset, rollout evaluator or None) for `train` on a policy task. Prints
    the data sanity summary (ranges per key, constant dims, image range, episode lengths) and saves it as
    <run_dir>/data_sanity.json; implausible data raises before any training (datasets/sanity.py)."""
    train_ds = build_dataset(cfg, "train")
    report = getattr(train_ds, "sanity_report", None)
    if report is not None:
        print(report.summary(), flush=True)
        if run_dir is not None:
            report.save_json(Path(run_dir) / "data_sanity.json")
    val_ds = train_ds.get_validation_dataset()
    policy = build_policy(cfg, train_ds.get_normalizer())
    tcfg = cfg["train"]
    evaluator = None
    if int(tcfg.get("eval_every") or 0) > 0:
        ev = to_plain(cfg["task"]).get("eval", {})
        n_eval = tcfg.get("eval_episodes") or ev.get("n_episodes", 50)
        seed_start = tcfg.get("eval_seed_start")
        seed_start = ev.get("seed_start", TEST_SEED_START) if seed_start is None else seed_start
        evaluator = RolloutEvaluator(
            to_plain(cfg["task"]),
            int(n_eval),
            int(seed_start),
            steps=int(tcfg.get("eval_steps", 1)),
            run_dir=run_dir,
            n_workers=ev.get("n_workers"),
            envs_per_worker=ev.get("envs_per_worker"),
            n_action_steps=tcfg.get("eval_n_action_steps"),
            warm_start=tcfg.get("eval_warm_start"),
        )
        evaluator.check(policy)
    return policy, train_ds, val_ds, evaluator


def build_image_training(cfg, run_dir=None):
    """(generator, train dataset, None, None) for `train` on an image task (no validation set, no rollouts)."""
    return build_generator(cfg), build_image_dataset(cfg), None, None


def build_training(cfg, run_dir):
    """(model, train dataset, validation dataset or None, evaluator or None) for `train`, by ``task.kind``
    (policy | image)."""
    kind = cfg.task.get("kind", "policy")
    if kind == "image":
        return build_image_training(cfg, run_dir)
    if kind == "policy":
        return build_policy_training(cfg, run_dir)
    raise ValueError(f"task.kind={kind!r}: expected 'policy' or 'image'")
