"""Mixed precision: ``train.precision: fp32 | bf16 | fp16``.

What it does: forward pass and loss run under ``torch.autocast`` in the low dtype (weights,
gradients and the optimizer stay fp32); fp16 adds a ``GradScaler`` so small gradients do not
underflow. When it helps: hardware with native low-precision math (tensor cores, AVX-512-BF16,
AMX). What it costs: on CPUs without it (AVX2 only) bf16/fp16 are emulated and usually slower
than fp32; accuracy may move by a little. A device that cannot autocast to the dtype makes the run
``skipped`` with the reason (checked with a real op, not a table).
"""

from __future__ import annotations

import contextlib
import functools

from cnnbench.techniques.base import Technique, register


@functools.cache  # called per batch by autocast
def dtype(precision: str):
    """The torch dtype of ``fp32`` / ``bf16`` / ``fp16``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_supported(precision: str, device) -> None:
    """Raise :class:`cnnbench.devices.Unsupported` if ``device`` cannot train in ``precision``."""
    import torch

    from cnnbench.devices import Unsupported

    if precision == "fp32":
        return
    if device.type == "xla" and precision == "fp16":
        raise Unsupported("precision fp16 on XLA is not supported (XLA's autocast targets bf16); use precision: bf16")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise Unsupported(f"precision bf16 needs a GPU with bf16 support; {torch.cuda.get_device_name(device)} has none")
    try:
        conv = torch.nn.Conv2d(1, 2, 3).to(device)
        with autocast(precision, device):
            out = conv(torch.ones(1, 1, 5, 5, device=device))
        out.float().sum().backward()
        if precision == "fp16":
            torch.amp.GradScaler(device.type)
    except Exception as e:  # noqa: BLE001 - whatever the backend says is the reason
        raise Unsupported(f"precision {precision} is not supported on {device} (torch {torch.__version__}): "
                          f"{type(e).__name__}: {e}") from None
    if out.dtype != dtype(precision):
        raise Unsupported(f"precision {precision}: autocast on {device} ran the convolution in {out.dtype}")


def autocast(precision: str, device):
    """The autocast context for the forward pass and loss (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype(precision))


def grad_scaler(precision: str, device):
    """A GradScaler for fp16 (dynamic loss scaling); None otherwise."""
    import torch

    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@register
class Precision(Technique):
    """Settings in ``train:`` (``precision``); the training step calls :func:`autocast` and :func:`grad_scaler`."""

    name, stage = "precision", "training"
    summary = "autocast the forward pass and loss to bf16/fp16 (fp16 with a GradScaler)"

    def active(self, exp) -> bool:
        return exp.train.precision != "fp32"

    def check_device(self, exp, device) -> None:
        check_supported(exp.train.precision, device)

    def describe(self, exp) -> str:
        return f"{exp.train.precision} autocast" + (" with a GradScaler" if exp.train.precision == "fp16" else "")
