"""Benchmarks of the ``bench`` verb (:mod:`shortcut_policy.commands.bench`), quality and speed side by side:
:mod:`.toy` (2-D toy data), :mod:`.images` (digits FID), :mod:`.policies` (objectives trained and rolled out on one
task), :mod:`.policy_latency` (batch-1 latency at Diffusion Policy's size). Import the submodule you need."""
