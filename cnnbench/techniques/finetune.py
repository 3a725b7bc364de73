"""``finetune: {epochs}``: continue training a trained model and change nothing else.

Method card. *What*: the variant starts from its source's trained weights (the baseline's, or
``start_from``) and trains ``epochs`` more at its own optimizer settings. *When it helps*: as the
control of compression variants that fine-tune (pruned, factorized, quantization-aware): compared with
it (``report.against``), a pruned-and-fine-tuned model shows what pruning costs, not what an extra
epoch of training gains. *Cost*: the epochs.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from cnnbench.settings import Strict
from cnnbench.techniques.base import Technique, register


class FinetuneConfig(Strict):
    """More epochs of training for a trained model, nothing else changed: the control for compression."""

    epochs: PositiveInt = Field(description="epochs of training added to the source's trained weights")


@register
class Finetune(Technique):
    """Applied first of the post-training techniques (with another one, it trains before that one applies)."""

    name, stage, block, order = "finetune", "post_training", FinetuneConfig, 5
    summary = "continue training a trained model (the same-epochs control of fine-tuned compression variants)"

    def finetune_epochs(self, exp) -> int:
        return exp.finetune.epochs

    def describe(self, exp) -> str:
        epochs = exp.finetune.epochs
        return f"fine-tune {epochs} epoch{'s' if epochs != 1 else ''}, nothing removed"

    def apply(self, exp, model, context):
        context.finetune(model, exp.finetune.epochs)
        return model
