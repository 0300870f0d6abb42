"""The environment registry: every environment is one :class:`EnvSpec` under a name; everything else looks it up.

The name is the ``env`` field of a task config (configs/task/*.yaml). ``eval`` (the rollout workers and the
scripted expert), ``train``'s rollout evaluation, ``demos`` and ``deploy``'s simulated robot all go through
:func:`get_env_spec` / :func:`make_env`; nothing else names an environment. An entry holds:

* ``make``       builds the bare env from a task config: ``make(task_cfg) -> gymnasium.Env`` with dict
                 observations of Box spaces (the task's ``obs_shapes`` keys), Box actions, ``info["success"]``;
* ``expert``     the privileged scripted expert class (optional): ``Expert(seed, **expert_kwargs)``,
                 ``.reset(env)``, ``.act(env) -> action`` (one action; ``env`` is the wrapped env in ``eval
                 policy=expert``, the bare one in the default demos writer: use ``env.unwrapped`` for state);
* ``demos``      the ``demos`` verb's writer ``fn(cfg, run_dir) -> dict`` (RESULT keys n_episodes, n_dropped,
                 seconds, out); default :func:`shortcut_policy.envs.demos.expert_demos` (the expert's successful
                 episodes, every observation key and ``action``, in a zarr replay buffer);
* ``sim_robot``  the simulated robot class ``deploy`` runs the bare env in: ``cls(env, control_hz, n_obs_steps=,
                 latch_s=, name=, auto_reset=)`` (default :class:`shortcut_policy.deploy.sim_robot.SimRobot`);
* ``stages``     names of the task stages the env reports in ``info["stages"]`` (name -> first step, with the
                 task config's ``track_stages``; Transport), () when it reports none;
* ``requires``   optional distributions the env needs (named in the error when an import fails).

Each reference is an import path ``"module:attr"`` (resolved on first use) or the object itself. Import paths
keep an env's dependencies out of processes that never build it (robosuite + mujoco for Transport are optional)
and let an entry travel to spawned processes: the rollout runner hands its workers the caller's entry, so an
entry registered at run time (a test, a notebook) works in the workers when its references are import paths or
module-level objects (picklable).

Adding an environment: a module with the env (and optionally an expert), then one ``register_env`` call, here
for a built-in env or anywhere before the verbs run (e.g. ``register_env("reach", EnvSpec(make="my_pkg.reach:make"))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from shortcut_policy.envs.wrappers import wrap_env
from shortcut_policy.utils import cfg_get, import_attr

Ref = Union[str, Callable[..., Any]]  # "module:attr" or the object

DEFAULT_DEMOS = "shortcut_policy.envs.demos:expert_demos"
DEFAULT_SIM_ROBOT = "shortcut_policy.deploy.sim_robot:SimRobot"


@dataclass(frozen=True)
class EnvSpec:
    """One environment: how to build it and what the verbs use with it (see the module docstring)."""

    make: Ref
    expert: Ref | None = None
    demos: Ref | None = DEFAULT_DEMOS
    sim_robot: Ref = DEFAULT_SIM_ROBOT
    stages: tuple[str, ...] | str = ()
    requires: tuple[str, ...] = field(default=())  # optional distributions it needs, named when an import fails

    def __post_init__(self):
        if self.make is None:
            raise ValueError("EnvSpec.make is required: 'module:function' building the bare env from a task config")


_REGISTRY: dict[str, EnvSpec] = {}


def register_env(name: str, spec: EnvSpec | str, replace: bool = False) -> EnvSpec:
    """Register ``spec`` (an :class:`EnvSpec`, or ``"module:attr"`` naming one) under ``name``. Registering an
    equal spec again is a no-op; a different spec under a taken name raises ValueError unless ``replace``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_env: name={name!r}: expected a non-empty string")
    if isinstance(spec, str):
        spec = import_attr(spec)
    if not isinstance(spec, EnvSpec):
        raise TypeError(
            f"register_env({name!r}): expected an EnvSpec (or 'module:attr' naming one), got {type(spec).__name__}"
        )
    old = _REGISTRY.get(name)
    if old is not None and old != spec and not replace:
        raise ValueError(f"register_env: env {name!r} is already registered ({old}); pass replace=True to replace it")
    _REGISTRY[name] = spec
    return spec


def unregister_env(name: str) -> None:
    """Remove ``name`` from the registry (no error when it is not registered)."""
    _REGISTRY.pop(name, None)


def registered_envs() -> list[str]:
    """Names of the registered envs, sorted."""
    return sorted(_REGISTRY)


def env_name(task_cfg) -> str | None:
    """The ``env`` of a task config (a plain string is taken as the name itself)."""
    return task_cfg if isinstance(task_cfg, str) else cfg_get(task_cfg, "env")


def get_env_spec(task_cfg_or_name) -> EnvSpec:
    """The entry for a task config's ``env`` (or a name); ValueError naming the registered envs otherwise."""
    name = env_name(task_cfg_or_name)
    if name not in _REGISTRY:
        raise ValueError(
            f"task env={name!r}: unknown environment; expected one of {registered_envs()} "
            "(register one with shortcut_policy.envs.registry.register_env)"
        )
    return _REGISTRY[name]


def resolve(ref: Ref, what: str = "", spec: EnvSpec | None = None):
    """The object behind a reference (``"module:attr"`` is imported); a missing module becomes a ValueError that
    says what needed it (and the env's optional requirements)."""
    if not isinstance(ref, str):
        return ref
    try:
        return import_attr(ref)
    except ModuleNotFoundError as e:
        needs = f" (the env requires {', '.join(spec.requires)})" if spec is not None and spec.requires else ""
        raise ValueError(f"{what or ref} needs {ref.partition(':')[0]}, which is not available ({e}){needs}") from e


def make_env(task_cfg, wrap: bool = True, video: bool = False):
    """The env of a task config: the entry's ``make(task_cfg)``, wrapped as the rollout runner uses it when
    ``wrap`` (``MultiStepWrapper(VideoRecorder(env, enabled=video), To, Ta, max_steps)``, see
    :func:`shortcut_policy.envs.wrappers.wrap_env`)."""
    spec = get_env_spec(task_cfg)
    name = env_name(task_cfg)
    env = resolve(spec.make, f"task env={name!r}", spec)(task_cfg)
    return wrap_env(env, task_cfg, video=video) if wrap else env


def expert_class(task_cfg_or_name, override: Ref | None = None):
    """The scripted expert reference of an env (``override``, e.g. eval's ``expert=module:Class``, wins);
    ValueError when it has none."""
    if override:
        return override
    name = env_name(task_cfg_or_name)
    spec = get_env_spec(name)
    if spec.expert is None:
        have = [n for n in registered_envs() if _REGISTRY[n].expert is not None]
        raise ValueError(f"no scripted expert for env={name!r}; expected one of {have} or expert=module:Class")
    return spec.expert


def stage_names(task_cfg_or_name) -> tuple[str, ...]:
    """The task stages an env reports in ``info["stages"]`` (() when none)."""
    spec = get_env_spec(task_cfg_or_name)
    stages = resolve(spec.stages, "stages", spec) if isinstance(spec.stages, str) else spec.stages
    return tuple(stages or ())


# ---------------------------------------------------------------------------------------------------------
# built-in environments. Import paths only: pygame/pymunk (Push-T) and robosuite + mujoco (Transport, optional:
# the `sim` extra) are imported by the process that builds the env, never by `import shortcut_policy...`.
register_env(
    "pusht",
    EnvSpec(
        make="shortcut_policy.envs.pusht:build_env",
        expert="shortcut_policy.envs.experts.pusht:PushTExpert",
        demos="shortcut_policy.envs.experts.pusht:demos",
    ),
)
register_env(
    "transport",
    EnvSpec(
        make="shortcut_policy.envs.transport:build_env",
        expert="shortcut_policy.envs.experts.transport:TransportExpert",
        demos="shortcut_policy.envs.experts.transport:demos",
        stages="shortcut_policy.envs.transport:TASK_STAGES",
        requires=("robosuite", "mujoco"),
    ),
)
