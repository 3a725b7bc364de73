"""A post-training variant: load its source's trained weights, apply its techniques in order
(``low_rank``, ``prune``, ``quantize``; :mod:`cnnbench.techniques`), fine-tuning where they ask.

The techniques see a :class:`PostTraining` context: ``finetune(model, epochs)`` (several calls are
reported as one run whose epochs and training time continue), ``calibration_batches(n)`` (training
batches only, drawn with the run's seed), and the ``metrics``/``artifacts``/``tags`` of the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from cnnbench import techniques
from cnnbench.config import Experiment
from cnnbench.evaluation import normalizer


class PostTraining:
    """What a post-training technique may use while it turns a trained model into the deployed one."""

    def __init__(self, exp: Experiment, seed: int, split, device: torch.device, on_epoch=None, on_batch=None):
        self.exp, self.seed, self.split, self.device = exp, seed, split, device
        self.on_epoch, self.on_batch = on_epoch, on_batch
        self.history: list[dict] = []
        self.train_time = 0.0
        self.images = 0
        self.diverged: str | None = None
        self.metrics: dict[str, float] = {}
        self.artifacts: dict = {}
        self.tags: dict[str, str] = {}
        self.float_model = None  # set by a technique whose deployed model is no longer a float nn.Module
        self.quantized = False  # the deployed model runs int8 kernels on the CPU, compiled

    def finetune(self, model, epochs: int, device: torch.device | None = None, loss_fn=None) -> None:
        """Train ``model`` in place for ``epochs`` with the variant's settings (no early stopping, no target)."""
        from cnnbench.train import train

        if epochs <= 0 or self.diverged:
            return
        exp = self.exp.model_copy(update={"train": self.exp.train.model_copy(
            update={"epochs": epochs, "early_stopping_patience": None, "target_accuracy": None})})
        offset, t_offset = len(self.history), self.train_time

        def on_epoch(record: dict) -> None:
            record = dict(record, epoch=record["epoch"] + offset, train_time_cum_s=record["train_time_cum_s"] + t_offset)
            self.history.append(record)
            if self.on_epoch is not None:
                self.on_epoch(record)

        result = train(exp, self.seed, self.split, device or self.device, on_epoch=on_epoch, on_batch=self.on_batch,
                       evaluate_test=False, model=model, loss_fn=loss_fn)
        self.train_time += result.metrics["train_time_s"]
        self.images += len(self.split.train_idx) * (result.metrics["epochs_completed"] + (result.status == "diverged"))
        if result.status == "diverged":
            self.diverged = result.message

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        """``n`` normalized training batches (never validation or test) on the CPU, drawn with the run's seed."""
        return calibration_batches(self.split, self.exp.data.batch_size, n, self.seed)


def calibration_batches(split, batch_size: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` normalized training batches (never validation or test) on the CPU, drawn with ``seed``."""
    scale, shift = normalizer(split.data, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    idx = split.train_idx[torch.randperm(len(split.train_idx), generator=gen)]
    x = split.data.train_x
    return [x[idx[i:i + batch_size]].float().mul_(scale).sub_(shift)
            for i in range(0, min(len(idx), n * batch_size), batch_size)]


def run_post_training(exp: Experiment, seed: int, split, device: torch.device, state: dict[str, torch.Tensor],
                      on_epoch: Callable | None = None, on_batch: Callable | None = None):
    """Load ``state`` into the variant's model and apply its post-training techniques: a RunResult whose
    ``model`` is what is deployed (tested and timed by :func:`cnnbench.deployment.measure`)."""
    from cnnbench.train import RunResult, initial_model

    model = initial_model(exp, seed, split.data)
    model.load_state_dict(state)
    context = PostTraining(exp, seed, split, device, on_epoch, on_batch)
    applied = []
    t0 = time.perf_counter()
    for technique in techniques.active(exp, "post_training"):
        if context.diverged:
            break
        model = technique.apply(exp, model, context)
        applied.append(technique.describe(exp))
    result = RunResult(status="finished", history=context.history, artifacts=context.artifacts)
    result.metrics.update(context.metrics)
    result.metrics["compress_time_s"] = time.perf_counter() - t0 - context.train_time
    result.tags.update(context.tags)
    result.tags["cnnbench.compression"] = "; ".join(applied)
    result.metrics.update(
        train_time_s=context.train_time, epochs_completed=len(context.history),
        train_throughput=context.images / context.train_time if context.train_time > 0 else math.nan)
    if context.diverged:
        result.status, result.message = "diverged", f"fine-tuning {context.diverged}"
        return result
    result.model, result.float_model, result.quantized = model, context.float_model, context.quantized
    return result
