"""Knowledge distillation (Hinton et al., 2015).

Method card. *What*: the student learns from the teacher's softened outputs as well as the labels:
loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(student, labels); T² keeps the
soft term's gradients on the scale of the hard term's. *When it helps*: a small student with a much
better teacher, little data or few epochs. *Cost*: a teacher forward pass per training batch
(counted in the student's training time) and training the teacher once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float, label_smoothing: float = 0.0):
    """A ``loss_fn(logits, labels, inputs)`` for :func:`cnnbench.train.train`; the teacher runs frozen, in eval mode."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t = float(temperature)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft_targets = F.log_softmax(teacher(inputs).float() / t, dim=1)
        soft = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft_targets, reduction="batchmean", log_target=True)
        hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return alpha * t * t * soft + (1.0 - alpha) * hard

    return loss_fn
