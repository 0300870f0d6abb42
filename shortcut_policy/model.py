"""The trainer's model contract, written once: :class:`TrainableModel`.

A model is an ``nn.Module`` holding a ``net`` and an ``objective``; the trainer calls ``model(batch, teacher=...,
frozen=...)`` (so DDP wraps the call) which is :meth:`TrainableModel.compute_loss`, and builds a distillation teacher
with ``type(model).load_teacher(path, like=model)``. Subclasses: :class:`~shortcut_policy.policy.Policy`,
:class:`~shortcut_policy.generator.ImageGenerator` and the toy benchmark's ``VectorModel``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["TrainableModel"]


class TrainableModel(nn.Module):
    """Base of every model the trainer trains: ``forward(batch, teacher=None, frozen=None) -> (loss, info)``.

    ``teacher``: the network that builds self-consistency targets (the EMA copy or the model itself, chosen by the
    trainer from ``objective.teacher``); ``frozen``: a trained teacher model of the same class for distillation
    objectives (``objective.teacher_checkpoint``), or None.
    """

    def compute_loss(self, batch, teacher=None, frozen=None):
        """``(loss, info)`` of the objective on ``batch``; every subclass implements it. Raises NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__}.compute_loss")

    def forward(self, batch, teacher=None, frozen=None):
        """The trainer's (and DDP's) entry point: :meth:`compute_loss`."""
        return self.compute_loss(batch, teacher, frozen)

    @classmethod
    def load_teacher(cls, path, like: "TrainableModel") -> "TrainableModel":
        """A trained model of this class to distil from, checked against the student ``like``. Raises ``ValueError``
        for a class that cannot distil (the default)."""
        raise ValueError(f"{cls.__name__} cannot learn from a teacher checkpoint ({path})")
