"""Privileged scripted experts, one module per environment, each with its ``demos`` writer.

* :mod:`shortcut_policy.envs.experts.pusht`: ``PushTExpert`` and ``demos`` (Diffusion Policy's zarr layout);
* :mod:`shortcut_policy.envs.experts.transport`: ``TransportExpert`` and ``demos`` (robomimic hdf5 + zarr).

The env registry (:mod:`shortcut_policy.envs.registry`) names them per env (``EnvSpec.expert`` / ``EnvSpec.demos``);
the ``demos`` verb (:mod:`shortcut_policy.commands.demos`) calls the writer of ``task.env``. This package imports
nothing, so importing one expert never loads another env's dependencies.
"""
