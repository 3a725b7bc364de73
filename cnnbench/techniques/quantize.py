"""int8 quantization through torchao's PT2E flow with ``X86InductorQuantizer``.

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

import torch
from torch import nn

PATH = "torchao PT2E, X86InductorQuantizer"
LAYERS = {"dynamic": "Linear only (convolutions stay fp32)", "static": "Conv2d and Linear", "qat": "Conv2d and Linear"}


def _quantizer(method: str):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    if method == "dynamic":
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
        quantizer.set_module_type_qconfig(nn.Linear, config)  # the x86 quantizer's dynamic mode is Linear-only
    else:
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=method == "qat"))
    return quantizer


def export(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` (strict) with a dynamic batch dimension, as a GraphModule."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True).module()


def quantize_ptq(model: nn.Module, method: str, example: torch.Tensor,
                 calibration: Iterable[torch.Tensor] = ()) -> torch.fx.GraphModule:
    """Dynamic or static post-training quantization of ``model`` (on the CPU) → converted GraphModule."""
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


def quantize_qat(model: nn.Module, example: torch.Tensor,
                 finetune: Callable[[nn.Module], None]) -> torch.fx.GraphModule:
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


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` specialized to each batch size seen (a dynamic batch dimension trips an assertion
    in inductor's int8 convolution lowering in torch 2.14.1: one compilation per batch size instead)."""
    return torch.compile(model, dynamic=False)
