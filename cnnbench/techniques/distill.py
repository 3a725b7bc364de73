"""Knowledge distillation (Hinton et al., 2015): ``distill: {teacher, temperature, alpha}``.

Method card. *What*: the student learns from the teacher's softened outputs as well as the labels:
loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(student, labels); T² keeps the
soft term's gradients on the scale of the hard term's. *When it helps*: a small student with a much
better teacher, little data or few epochs. *Cost*: a teacher forward pass per training batch
(counted in the student's training time) and training the teacher once.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat

from cnnbench.settings import ModelConfig, Strict
from cnnbench.techniques.base import Reference, Technique, register


class DistillConfig(Strict):
    """Knowledge distillation: the student (this variant's model) is trained on α·T²·KL(soft targets) + (1-α)·CE."""

    teacher: str = Field(description="a variant of this suite (trained once per seed and reused), a checkpoint file, "
                                     "or runs:/<id>/<path>")
    temperature: PositiveFloat = 4.0
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the soft-target loss")
    teacher_model: ModelConfig | None = Field(None, description="the teacher's architecture when teacher is a checkpoint")


def distillation_loss(teacher, temperature: float, alpha: float, label_smoothing: float = 0.0):
    """A ``loss_fn(logits, labels, inputs)`` for :func:`cnnbench.train.train`; the teacher runs frozen, in eval mode."""
    import torch
    import torch.nn.functional as F

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t = float(temperature)

    def loss_fn(logits, labels, inputs):
        with torch.no_grad():
            soft_targets = F.log_softmax(teacher(inputs).float() / t, dim=1)
        soft = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft_targets, reduction="batchmean", log_target=True)
        hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return alpha * t * t * soft + (1.0 - alpha) * hard

    return loss_fn


@register
class Distill(Technique):
    name, stage, block = "distill", "training", DistillConfig
    summary = "train a student on a teacher's softened outputs as well as the labels"

    def check(self, exp) -> list[tuple[tuple[str, ...], str]]:
        if exp.compresses:
            return [(("distill",), "distill trains a student from scratch, quantize/prune/low_rank start from trained "
                                   "weights: use two variants (the compression with start_from: <the distilled variant>)")]
        return []

    def references(self, exp) -> list[Reference]:
        d = exp.distill
        return [Reference(("distill", "teacher"), d.teacher, "its teacher", d.teacher_model)]

    def loss(self, exp, context):
        from cnnbench.models import build

        d = exp.distill
        c, h, _ = context.data.shape
        teacher = build(context.models[d.teacher], in_channels=c, num_classes=context.data.num_classes, image_size=h)
        teacher.load_state_dict(context.weights[d.teacher])
        return distillation_loss(teacher.to(context.device), d.temperature, d.alpha, exp.train.label_smoothing)

    def describe(self, exp) -> str:
        d = exp.distill
        return f"distilled from `{d.teacher}` (T = {d.temperature:g}, α = {d.alpha:g})"
