"""Techniques: one module each, registered on import (:mod:`cnnbench.techniques.base` says what a
technique declares). Training: ``precision``, ``compile``, ``distill``. Post-training, applied in this
order to a trained model: ``low_rank``, ``prune``, ``quantize``."""

from cnnbench.techniques import compile, distill, low_rank, precision, prune, quantize  # noqa: F401 - registers them
from cnnbench.techniques.base import Reference, Technique, TrainingContext, active, blocks, register, registered

__all__ = ["Reference", "Technique", "TrainingContext", "active", "blocks", "register", "registered"]
