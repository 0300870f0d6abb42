"""The CLI's verbs, one module per verb: ``shortcut_policy.commands.<verb>.<verb>_command(cfg, run_dir) -> dict``.

A command turns a composed config (configs/<verb>.yaml) into calls of the library: builders
(:mod:`shortcut_policy.builders`), the env registry (:mod:`shortcut_policy.envs.registry`), the rollout runner,
the trainer, the deploy loop. An optional ``<verb>_command_preflight(cfg, run_dir)`` in the same module runs
before the CLI writes anything (train: resume checks). The library never imports this package, the CLI or Hydra.

Modules: train, eval, demos, bench, sample, fid, latents, deploy, export, import_ (the ``import`` verb), distill,
convert, serve (see
``shortcut_policy.commands.runner.VERBS``), and :mod:`~shortcut_policy.commands.runner`, which runs a verb in its run
directory (used by the CLI and by ``bench``). This package imports none of them, so the CLI loads only the verb it
runs.
"""
