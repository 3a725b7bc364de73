"""int8 quantization through torchao's PT2E flow with ``X86InductorQuantizer``: ``quantize: {method}``.

Why this path: torch 2.14 no longer ships torch.ao's PT2E modules, and its eager/FX modes warn that
they are deprecated in favour of torchao. PT2E exports the model with ``torch.export`` (strict, so
ResNet-style blocks trace), inserts observers, and converts to a graph of int8 weights with
quantize/dequantize pairs; ``torch.compile`` (inductor, with freezing) then fuses those pairs into
oneDNN int8 kernels. Run eagerly, the converted graph only *simulates* int8 (slower than fp32), so
quantized models are measured compiled.

Method card. *dynamic*: Linear layers only (weights int8, activations quantized per batch at run
time; convolutions stay fp32) — no calibration data. *static*: Conv2d and Linear, activation ranges
from ``calibration_batches`` training batches. *qat*: static, after fine-tuning with fake
quantization so the weights adapt to int8 rounding. Costs: accuracy (usually small for static on
MNIST-size nets), export constraints on the model, and an inductor compile before the first call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Literal

from pydantic import Field, PositiveInt

from cnnbench.settings import Strict
from cnnbench.techniques.base import Technique, register

PATH = "torchao PT2E, X86InductorQuantizer"
LAYERS = {"dynamic": "Linear only (convolutions stay fp32)", "static": "Conv2d and Linear", "qat": "Conv2d and Linear"}


class QuantizeConfig(Strict):
    """int8 quantization of a trained model (torchao PT2E with X86InductorQuantizer)."""

    method: Literal["dynamic", "static", "qat"] = Field(
        description="dynamic: Linear layers only, activations quantized at run time; static: Conv and Linear, "
                    "activation ranges calibrated on training batches; qat: static after quantization-aware fine-tuning")
    backend: Literal["x86"] = Field("x86", description="x86: torchao's X86InductorQuantizer (oneDNN int8 kernels via inductor)")
    calibration_batches: PositiveInt = Field(32, description="static: training batches observed to set activation ranges")
    qat_epochs: PositiveInt = Field(1, description="qat: epochs of fine-tuning with fake quantization")


def _quantizer(method: str):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torch import nn

    quantizer = xiq.X86InductorQuantizer()
    if method == "dynamic":
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
        quantizer.set_module_type_qconfig(nn.Linear, config)  # the x86 quantizer's dynamic mode is Linear-only
    else:
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=method == "qat"))
    return quantizer


def export(model, example):
    """``torch.export`` (strict) with a dynamic batch dimension, as a GraphModule."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True).module()


def quantize_ptq(model, method: str, example, calibration: Iterable = ()):
    """Dynamic or static post-training quantization of ``model`` (on the CPU) → converted GraphModule."""
    import torch
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = model.cpu().eval()
    prepared = prepare_pt2e(export(model, example), _quantizer(method))
    with torch.no_grad():
        for xb in calibration if method == "static" else [example]:
            prepared(xb)
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)
    return converted


def quantize_qat(model, example, finetune: Callable[[object], None]):
    """Quantization-aware training: export in training mode, insert fake quantizers, ``finetune`` the
    prepared graph (it is a module with working ``train()``/``eval()``), then convert."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    model = model.cpu().train()
    prepared = prepare_qat_pt2e(export(model, example), _quantizer("qat"))
    allow_exported_model_train_eval(prepared)
    finetune(prepared)
    move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)
    return converted


@contextlib.contextmanager
def inductor_freezing():
    """Inductor's freezing turns the int8 weights into constants so the q/dq patterns fuse into
    oneDNN int8 convolutions/matmuls; compilation happens at the first call, so calls go inside."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


def compiled(model):
    """``torch.compile`` specialized to each batch size seen (a dynamic batch dimension trips an assertion
    in inductor's int8 convolution lowering in torch 2.14.1: one compilation per batch size instead)."""
    import torch

    return torch.compile(model, dynamic=False)


@register
class Quantize(Technique):
    """Last of the post-training techniques: it turns the float model into an int8 graph, deployed compiled on the CPU."""

    name, stage, block, order = "quantize", "post_training", QuantizeConfig, 90
    summary = "int8 through torchao PT2E for x86: dynamic, static or quantization-aware"

    def finetune_epochs(self, exp) -> int:
        return exp.quantize.qat_epochs if exp.quantize.method == "qat" else 0

    def describe(self, exp) -> str:
        q = exp.quantize
        return (f"quantize {q.method} int8 ({PATH}; {LAYERS[q.method]}"
                + (f"; {q.calibration_batches} calibration batches" if q.method == "static" else "")
                + (f"; {q.qat_epochs} QAT epoch{'s' if q.qat_epochs != 1 else ''}" if q.method == "qat" else "")
                + ")")

    def apply(self, exp, model, context):
        import torch

        q = exp.quantize
        example = context.calibration_batches(1)[0]
        context.float_model = model  # FLOPs and parameter counts are of the float model
        if q.method == "qat":
            deployed = quantize_qat(model, example, lambda m: context.finetune(m, q.qat_epochs, torch.device("cpu")))
        else:
            calibration = context.calibration_batches(q.calibration_batches) if q.method == "static" else []
            deployed = quantize_ptq(model, q.method, example, calibration)
        context.tags["cnnbench.quantization_path"] = PATH
        context.quantized = True  # the x86 int8 kernels run on the CPU, through inductor
        return deployed
