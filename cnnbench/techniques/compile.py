"""``train.compile`` / ``compile_mode``: torch.compile the model used for training steps.

What it does: TorchDynamo captures the forward (and AOTAutograd the backward) and Inductor
generates fused kernels. When it helps: larger models and GPUs; on a 2-core CPU the small MNIST
nets measured 0.56–0.87× eager after 4–20 s of compiling (measured on 2-core x86 CPUs, torch 2.14). What it costs: compilation
on the first step and again on any new input shape (the last, smaller batch of an epoch). That time
is reported as ``compile_time_s`` and excluded from ``train_throughput`` (steady state); it stays in
``train_time_s`` and time-to-target, which are what a user waits for.
"""

from __future__ import annotations

from cnnbench.techniques.base import Technique, register


def compile_model(model, mode: str):
    """The compiled module; it shares parameters with ``model`` (evaluation keeps using ``model``).

    Dynamo's in-memory caches are reset first: compiled code is reused across module instances of
    the same structure, so without the reset only the first run of a suite would pay (and report)
    compilation. Inductor's on-disk cache is kept, as a user's would be: the first compile on a
    machine is "cold", later ones of the same graph are faster."""
    import torch

    torch._dynamo.reset()
    return torch.compile(model, mode=None if mode == "default" else mode)


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far (forward graphs, and
    backward graphs compiled lazily on their first use).

    Read from TorchDynamo's own timing table (``torch._dynamo.utils.compilation_time_metrics``, the
    data behind ``torch._dynamo.utils.compile_times()``); callers take differences. Returns 0.0 if
    a torch version lacks the table, so the metric degrades to "not measured", never to an error.
    """
    try:
        from torch._dynamo.utils import compilation_time_metrics as table
    except ImportError:
        return 0.0
    keys = ("_compile.compile_inner", "backward._backward_impl")
    return float(sum(sum(table.get(k, ())) for k in keys))


@register
class Compile(Technique):
    """Settings in ``train:`` (``compile``, ``compile_mode``)."""

    name, stage = "compile", "training"
    summary = "torch.compile the training step's model"

    def active(self, exp) -> bool:
        return exp.train.compile

    def check_device(self, exp, device) -> None:
        from cnnbench.devices import Unsupported

        if device.type == "xla":
            raise Unsupported("train.compile on XLA: torch_xla compiles every step's graph already; "
                              "use compile: false there")

    def step_model(self, exp, model):
        return compile_model(model, exp.train.compile_mode)

    def describe(self, exp) -> str:
        return f"torch.compile ({exp.train.compile_mode})"
