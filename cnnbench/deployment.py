"""What runs at inference, and the figures measured on it after every run: a compressed model is tested
on what is deployed (the int8 graph of a quantized model, not its float copy), and every run's latency
(batch 1 and 64), size and parameter counts are measured (``inference:`` settings)."""

from __future__ import annotations

import contextlib
import math

import torch

from cnnbench import measure
from cnnbench.config import Experiment
from cnnbench.evaluation import test_metrics


def deployed(exp: Experiment, model, quantized: bool) -> tuple[torch.nn.Module, bool]:
    """The model that runs, compiled when ``inference.compile`` asks (auto: quantized models only, whose
    int8 kernels exist only through inductor); and whether it is compiled."""
    from cnnbench.techniques.quantize import compiled

    mode = exp.inference.compile
    if mode == "always" or (mode == "auto" and quantized):
        return compiled(model), True
    return model, False


def measure_deployed(result, exp: Experiment, split, device: torch.device) -> None:
    """Test a compressed model (on what is deployed) and add every run's inference metrics to ``result``."""
    from cnnbench.techniques.quantize import inductor_freezing

    if result.status != "finished" or result.model is None or not exp.inference.enabled and not exp.compresses:
        return
    model = result.model
    model.eval()  # not chained: torchao's eval() on exported graphs returns None
    float_model = result.float_model or model
    run_device = torch.device("cpu") if result.quantized else device  # the x86 int8 kernels run on the CPU
    run, is_compiled = deployed(exp, model, result.quantized)
    with inductor_freezing() if is_compiled else contextlib.nullcontext():
        if exp.compresses:
            metrics, result.confusion = test_metrics(run, split.data, exp.data.eval_batch_size, run_device)
            result.metrics.update(metrics)
        if exp.inference.enabled:
            result.metrics.update(measure.inference_metrics(
                run, float_model, split.data.shape, run_device, exp.inference.repeats, exp.inference.warmup))
            result.metrics["model_size_bytes"] = measure.model_size_bytes(model)
            result.tags["cnnbench.inference"] = (f"{run_device.type}, {torch.get_num_threads()} threads, "
                                                 + ("torch.compile (inductor)" if is_compiled else "eager"))
    if math.isnan(result.metrics.get("train_throughput", 0.0)):
        result.metrics.pop("train_throughput")
