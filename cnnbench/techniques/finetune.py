"""``finetune: {epochs}``: continue training a trained model and change nothing else.

Method card. *What*: the variant starts from its source's trained weights (the baseline's, or
``start_from``) and trains ``epochs`` more at its own optimizer settings. *When it helps*: as the
control of compression variants that fine-tune (pruned, factorized, quantization-aware): compared with
it (``report.against``), a pruned-and-fine-tuned model shows what pruning costs, not what an extra
epoch of training gains. And as transfer learning: a source trained on another task (``data.classes``),
fine-tuned on this variant's data with a new classifier (``new_head``), every layer or the classifier
alone (``freeze: backbone``, a linear probe). *Cost*: the epochs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from cnnbench.settings import Strict
from cnnbench.techniques.base import Technique, register


class FinetuneConfig(Strict):
    """More epochs of training for a trained model: the control for compression, or transfer learning."""

    epochs: PositiveInt = Field(description="epochs of training added to the source's trained weights")
    new_head: bool = Field(False, description="re-initialize the last Linear layer (the classifier) first: "
                                              "transfer to another task with as many classes")
    freeze: Literal["none", "backbone"] = Field(
        "none", description="backbone: train only the last Linear layer (a linear probe on the source's features)")


@register
class Finetune(Technique):
    """Applied first of the post-training techniques (with another one, it trains before that one applies)."""

    name, stage, block, order = "finetune", "post_training", FinetuneConfig, 5
    summary = "continue training a trained model (the same-epochs control of fine-tuned compression variants)"

    def finetune_epochs(self, exp) -> int:
        return exp.finetune.epochs

    def describe(self, exp) -> str:
        f = exp.finetune
        what = "the last layer only" if f.freeze == "backbone" else "every layer"
        return (f"fine-tune {f.epochs} epoch{'s' if f.epochs != 1 else ''}, {what}"
                + (", new head" if f.new_head else ", nothing removed"))

    def apply(self, exp, model, context):
        f = exp.finetune
        head = last_linear(model)
        if f.new_head:
            head.reset_parameters()
        frozen = [p for p in model.parameters() if p.requires_grad] if f.freeze == "backbone" else []
        for p in frozen:
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        try:
            context.finetune(model, f.epochs)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return model


def last_linear(model):
    """The classifier: the model's last ``nn.Linear``."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("finetune: new_head / freeze need a model whose last layer is an nn.Linear")
    return linears[-1]
