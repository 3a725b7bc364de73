"""Techniques: one module each, found and registered on import (:mod:`cnnbench.techniques.base` says
what a technique declares). Training: ``precision``, ``compile``, ``distill``. Post-training, applied in
their ``order`` to a trained model: ``low_rank``, ``prune``, ``quantize``. A new module here is a new
technique: nothing else lists them."""

import importlib
import pkgutil

from cnnbench.techniques.base import Reference, Technique, TrainingContext, active, blocks, register, registered

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Reference", "Technique", "TrainingContext", "active", "blocks", "register", "registered"]
