"""The technique interface: what a module registers so that the schema, the plan, ``validate`` and the
report all know a technique from that one place.

A technique is a subclass of :class:`Technique` in its own module, registered with
:func:`register`. It says

* **what it is**: ``name``, ``stage`` (``training``: changes how a model is trained from scratch;
  ``post_training``: starts from a trained model's weights — the source variant's, ``start_from``),
  and a method card (the module's docstring: what it does, when it helps, what it costs);
* **its schema**: ``block``, a pydantic model that becomes the experiment key ``<name>:`` (``None``
  when its settings live in ``train:``, like ``precision``), and ``check`` for rules that involve the
  rest of the experiment;
* **what it costs in epochs** (``finetune_epochs``) and **how a report describes it** (``describe``);
* **what it needs from other variants** (``references``: a distillation teacher);
* **what it does**: ``check_device`` (refuse a device, so the run is *skipped* with the reason),
  ``step_model`` (the module the training step calls), ``loss`` (replaces the cross-entropy), and for
  post-training techniques ``apply`` (the trained model → the model deployed, with fine-tuning through
  the context). Techniques are applied in ``order`` (factorize, then prune, then quantize).

Nothing here or in a technique module imports torch at import time (the report renders the schema
without it): the hooks import it when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel

Experiment = Any  # a cnnbench.config.Experiment (which is built from these techniques: not imported here)


@dataclass(frozen=True)
class Reference:
    """Trained weights a technique needs from elsewhere: a variant of the suite, a checkpoint file or a
    ``runs:/`` URI. ``keys``: where it is written in the experiment, for error messages."""

    keys: tuple[str, ...]
    ref: str
    role: str  # "its teacher"
    model: Any = None  # the ModelConfig of a checkpoint (None: a variant's own model)


class Technique:
    name: ClassVar[str]
    stage: ClassVar[Literal["training", "post_training"]]
    summary: ClassVar[str]  # one line, for `cnnbench list techniques`
    block: ClassVar[type[BaseModel] | None] = None
    order: ClassVar[int] = 50

    @classmethod
    def card(cls) -> str:
        """The method card: the module docstring."""
        import sys

        return (sys.modules[cls.__module__].__doc__ or "").strip()

    def settings(self, exp: Experiment) -> Any:
        """This technique's block in ``exp`` (None when absent)."""
        return getattr(exp, self.name, None) if self.block is not None else None

    def active(self, exp: Experiment) -> bool:
        return self.settings(exp) is not None

    def check(self, exp: Experiment) -> list[tuple[tuple[str, ...], str]]:
        """Problems with the rest of the experiment: (keys in the experiment, message)."""
        return []

    def references(self, exp: Experiment) -> list[Reference]:
        return []

    def finetune_epochs(self, exp: Experiment) -> int:
        """Post-training: epochs of fine-tuning this technique trains."""
        return 0

    def describe(self, exp: Experiment) -> str:
        return self.name

    # ── hooks, called while a run trains (import torch inside) ──

    def check_device(self, exp: Experiment, device) -> None:
        """Raise ``devices.Unsupported`` when ``device`` cannot run this technique."""

    def step_model(self, exp: Experiment, model):
        """The module the training step calls (evaluation keeps using ``model``)."""
        return model

    def loss(self, exp: Experiment, context: TrainingContext) -> Callable | None:
        """A ``loss_fn(logits, labels, inputs)`` replacing the cross-entropy, or None."""
        return None

    def apply(self, exp: Experiment, model, context):
        """Post-training: the trained ``model`` → the model this technique deploys."""
        raise NotImplementedError


@dataclass
class TrainingContext:
    """What a training-time hook may use: the referenced weights and their architectures (by ref), the
    data, the device."""

    weights: dict[str, dict]
    models: dict[str, Any]
    data: Any
    device: Any


_REGISTERED: dict[str, Technique] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: one instance of ``cls`` under ``cls.name``."""
    if cls.name in _REGISTERED:
        raise ValueError(f"technique '{cls.name}' is registered twice")
    _REGISTERED[cls.name] = cls()
    return cls


def registered() -> dict[str, Technique]:
    """Every technique, by name (importing :mod:`cnnbench.techniques` registers the shipped ones)."""
    return dict(_REGISTERED)


def blocks() -> dict[str, type[BaseModel]]:
    """Experiment key → schema block of the techniques that have one."""
    return {t.name: t.block for t in _REGISTERED.values() if t.block is not None}


def active(exp: Experiment, stage: str | None = None) -> list[Technique]:
    """The techniques ``exp`` switches on (of one ``stage``), in the order they apply."""
    found = [t for t in _REGISTERED.values() if (stage is None or t.stage == stage) and t.active(exp)]
    return sorted(found, key=lambda t: t.order)
