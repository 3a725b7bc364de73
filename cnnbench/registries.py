"""Every registry of names a suite can use, by kind: the one place that imports the modules filling them
(and so torch). ``cnnbench list`` prints them; ``run`` and ``validate`` check a suite's names against them."""

from __future__ import annotations

from cnnbench.augment import AUGMENTATIONS
from cnnbench.data import DATASETS
from cnnbench.layers import ACTIVATIONS, NORMS, POOLS
from cnnbench.models import MODELS
from cnnbench.optim import OPTIMIZERS, SCHEDULES
from cnnbench.registry import Registry


def all_registries() -> dict[str, Registry]:
    """kind → registry (``dataset``, ``augmentation``, ``model``, ``norm``, ``activation``, ``pool``, ``optimizer``,
    ``schedule``)."""
    return {r.kind: r for r in (DATASETS, AUGMENTATIONS, MODELS, NORMS, ACTIVATIONS, POOLS, OPTIMIZERS, SCHEDULES)}
