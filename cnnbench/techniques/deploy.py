"""``deploy: {fuse_bn, form}``: how a trained model is deployed for inference — batch norm folded into
the convolutions before it, and the form that runs it (eager, ``torch.compile``d, ``torch.export``ed).

Method card. *What*: ``fuse_bn`` folds each BatchNorm that follows a convolution into that convolution's
weights and bias (``torch.fx.experimental.optimization.fuse``: torch's own fx pass, which also covers
residual blocks), so inference runs one layer where training ran two. ``form``: ``eager`` runs the
module as it is; ``compiled`` through ``torch.compile`` (inductor, one graph per batch size);
``exported`` as the module of ``torch.export.export`` (the ahead-of-time graph that replaces TorchScript,
deprecated in current torch). *Check*: every deployed form's outputs are compared with the trained
model's on training batches; the largest absolute difference is the run's ``deploy_max_abs_diff``.
*When it helps*: fusion removes a pass over every feature map; compilation fuses elementwise work.
*Cost*: compilation time at the first call (not in the latency figures, which are warm).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cnnbench.settings import Strict
from cnnbench.techniques.base import Technique, register

CHECK_BATCHES = 4  # training batches the deployed outputs are compared on


class DeployConfig(Strict):
    """How the trained model is deployed: batch norm folded into the convolutions, and the form that runs it."""

    fuse_bn: bool = Field(False, description="fold every BatchNorm that follows a Conv into the conv (torch.fx fusion)")
    form: Literal["eager", "compiled", "exported"] = Field(
        "eager", description="eager: the module as it is; compiled: torch.compile (inductor); exported: "
                             "torch.export.export's module")


@register
class Deploy(Technique):
    """After the other post-training techniques that keep a float model (finetune, low_rank, prune)."""

    name, stage, block, order = "deploy", "post_training", DeployConfig, 80
    summary = "deploy for inference: batch norm folded into convs; eager, torch.compile'd or torch.export'ed"

    def finetune_epochs(self, exp) -> int:
        return 0

    def check(self, exp):
        if exp.quantize is not None:
            return [(("deploy",), "quantize deploys its own int8 graph (compiled); remove deploy from this variant")]
        return []

    def describe(self, exp) -> str:
        d = exp.deploy
        return ("batch norm folded into convs, " if d.fuse_bn else "") + {
            "eager": "eager", "compiled": "torch.compile (inductor)", "exported": "torch.export"}[d.form]

    def apply(self, exp, model, context):
        import copy

        import torch

        d = exp.deploy
        model.eval()
        trained = copy.deepcopy(model)
        batches = context.calibration_batches(CHECK_BATCHES)
        if d.fuse_bn:
            model = fuse_bn(model)
        if d.form == "exported":
            batch = {0: torch.export.Dim.AUTO}  # any batch size, as the other forms take
            model = exported(torch.export.export(model, (batches[0],), dynamic_shapes=(batch,)).module())
        elif d.form == "compiled":
            model = torch.compile(model, dynamic=False)
        with torch.no_grad():
            diff = max(float((model(x) - trained(x)).abs().max()) for x in batches)
        context.metrics["deploy_max_abs_diff"] = diff
        context.tags["cnnbench.deployment"] = self.describe(exp)
        return model


def exported(graph):
    """The module of a ``torch.export`` program, callable like any model. Its graph was traced in eval mode
    and has no train/eval switch (torch refuses ``eval()`` on it), so ``train``/``eval`` of the wrapper
    change nothing. (Defined here, not at import: this module must not import torch.)"""
    from torch import nn

    class Exported(nn.Module):
        def __init__(self, graph):
            super().__init__()
            self.graph_module = graph

        def forward(self, x):
            return self.graph_module(x)

        def train(self, mode: bool = True):
            self.training = mode
            return self

    return Exported(graph)


def fuse_bn(model):
    """``model`` (in eval mode) with every Conv→BatchNorm pair folded into one conv, by torch's fx pass."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval(), inplace=False)
