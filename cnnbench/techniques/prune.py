"""``prune: {method, amount, schedule, finetune_epochs}``: pruning with ``torch.nn.utils.prune`` (masks
made permanent before anything is measured), and channel pruning that rebuilds smaller Conv/Linear layers.

Method card. *What*: zero the smallest weights (unstructured), whole output channels (ln_structured),
or remove output channels (channel). *When it helps*: unstructured sparsity shrinks a model only
when stored sparse or compressed and does not speed dense kernels; removing channels makes every
later layer smaller, so dense inference gets faster. *Cost*: accuracy, recovered in part by
fine-tuning (iterative pruning alternates small steps and fine-tuning).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, model_validator

from cnnbench.settings import Strict
from cnnbench.techniques.base import Technique, register


class PruneConfig(Strict):
    """Pruning of a trained model: torch.nn.utils.prune masks (made permanent), or ``channel``: rebuilt smaller layers."""

    method: Literal["l1_unstructured", "random_unstructured", "global_unstructured", "ln_structured", "channel"] = Field(
        description="l1/random_unstructured: per layer; global_unstructured: smallest weights across all layers; "
                    "ln_structured: zeroes whole output channels (L2 norm); channel: removes output channels and "
                    "rebuilds smaller layers (the only kind that speeds up dense inference)")
    amount: float = Field(gt=0.0, lt=1.0, description="fraction of weights (channels for ln_structured/channel) removed")
    schedule: Literal["one_shot", "iterative"] = "one_shot"
    steps: int = Field(3, ge=2, description="iterative: pruning steps, each followed by finetune_epochs")
    finetune_epochs: NonNegativeInt = Field(0, description="epochs of fine-tuning after pruning (after each step if iterative)")

    @model_validator(mode="after")
    def _iterative_needs_finetuning(self) -> PruneConfig:
        if self.schedule == "iterative" and self.finetune_epochs == 0:
            raise ValueError("schedule: iterative prunes in steps with fine-tuning between them; set finetune_epochs ≥ 1 "
                             "(without it, use schedule: one_shot)")
        if self.schedule == "iterative" and self.method == "channel":
            raise ValueError("channel pruning is one_shot only (set schedule: one_shot)")
        return self


@register
class Prune(Technique):
    name, stage, block, order = "prune", "post_training", PruneConfig, 20
    summary = "zero the smallest weights or channels (torch.nn.utils.prune), or remove channels"

    def finetune_epochs(self, exp) -> int:
        p = exp.prune
        return p.finetune_epochs * (p.steps if p.schedule == "iterative" else 1)

    def describe(self, exp) -> str:
        p = exp.prune
        return (f"prune {p.method} {p.amount:.0%} ({p.schedule}"
                + (f", {p.steps} steps" if p.schedule == "iterative" else "")
                + f", {p.finetune_epochs} fine-tune epoch{'s' if p.finetune_epochs != 1 else ''}"
                + ("; layers rebuilt smaller" if p.method == "channel" else "; masks made permanent") + ")")

    def apply(self, exp, model, context):
        p = exp.prune
        if p.method == "channel":
            prune_channels(model, p.amount)
            context.finetune(model, p.finetune_epochs)
        else:
            steps = p.steps if p.schedule == "iterative" else 1
            for _ in range(steps):
                apply_masks(model, p.method, step_amount(p.amount, steps))
                context.finetune(model, p.finetune_epochs)  # masks stay applied while fine-tuning
            make_permanent(model)
        sp = sparsity(model)
        context.metrics["sparsity"] = sp["global"]
        context.artifacts["sparsity.json"] = sp
        return model


# ───────────────────────────── masks (torch.nn.utils.prune) ─────────────────────────────


def prunable(model) -> list:
    """The Conv2d and Linear layers (their ``weight`` is pruned; biases and norms are left alone)."""
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def apply_masks(model, method: str, amount: float) -> None:
    """Add (or compose with existing) pruning masks that remove ``amount`` of the remaining weights."""
    from torch.nn.utils import prune

    layers = prunable(model)
    if method == "global_unstructured":
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount)
        return
    for _, m in layers:
        if method == "l1_unstructured":
            prune.l1_unstructured(m, "weight", amount=amount)
        elif method == "random_unstructured":
            prune.random_unstructured(m, "weight", amount=amount)
        elif method == "ln_structured":
            if m is layers[-1][1]:
                continue  # the classifier's output channels are the classes
            prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
        else:
            raise ValueError(f"unknown pruning method '{method}'")


def make_permanent(model) -> None:
    """``prune.remove`` on every pruned layer: ``weight`` becomes a plain parameter holding the zeros,
    ``weight_orig`` and the mask (and the forward pre-hook) are gone."""
    from torch.nn.utils import prune

    for _, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def step_amount(amount: float, steps: int) -> float:
    """Per-step fraction of the remaining weights so that ``steps`` steps remove ``amount`` in all
    (each prune call on a pruned layer acts on the weights still unpruned)."""
    return 1.0 - (1.0 - amount) ** (1.0 / steps)


def sparsity(model) -> dict[str, float]:
    """Fraction of zero weights, per prunable layer and ``"global"`` over all of them."""
    out, zeros, total = {}, 0, 0
    for name, m in prunable(model):
        w = m.weight.detach()
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    out["global"] = zeros / max(total, 1)
    return out


# ───────────────────────────── channel pruning ─────────────────────────────


def _leaves(model) -> list:
    """(parent, attribute, module) of every leaf in forward order, for nested ``nn.Sequential`` models."""
    from torch import nn

    out = []

    def walk(parent) -> None:
        if not isinstance(parent, nn.Sequential):
            raise ValueError(f"channel pruning supports sequential conv nets (lenet5, mnist_net, simple_cnn); "
                             f"found {type(parent).__name__}")
        for attr, child in parent.named_children():
            if isinstance(child, nn.Sequential):
                walk(child)
            elif any(True for _ in child.children()):  # a block with its own forward (residual, attention)
                raise ValueError(f"channel pruning supports sequential conv nets (lenet5, mnist_net, simple_cnn); "
                                 f"found {type(child).__name__}")
            else:
                out.append((parent, attr, child))

    walk(model)
    return out


def prune_channels(model, amount: float):
    """Remove ``amount`` of the output channels of every Conv2d (those with the smallest L1 filter norm,
    chosen by ``prune.ln_structured``), rebuilding the conv, its norm, and the next conv or the first
    Linear after the flatten with fewer inputs. Works in place on nested ``nn.Sequential`` models
    whose layers run in order (lenet5, mnist_net, simple_cnn); anything else raises ``ValueError``."""
    import torch
    from torch import nn
    from torch.nn.utils import prune

    leaves = _leaves(model)
    keep: torch.Tensor | None = None  # surviving input channels of the next layer
    spatial = 1  # positions per channel at the flatten
    for i, (parent, attr, m) in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise ValueError("channel pruning does not support grouped convolutions")
            weight = m.weight.detach()
            bias = m.bias.detach() if m.bias is not None else None
            if keep is not None:
                weight = weight[:, keep]
            probe = nn.Conv2d(weight.shape[1], weight.shape[0], m.kernel_size, bias=False)
            probe.weight.data = weight.clone()
            prune.ln_structured(probe, "weight", amount=amount, n=1, dim=0)
            out_keep = probe.weight_mask.flatten(1).any(1).nonzero().flatten()
            new = nn.Conv2d(weight.shape[1], len(out_keep), m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=bias is not None, padding_mode=m.padding_mode)
            new.weight.data = weight[out_keep].clone()
            if bias is not None:
                new.bias.data = bias[out_keep].clone()
            setattr(parent, attr, new)
            keep = out_keep
        elif isinstance(m, nn.BatchNorm2d) and keep is not None:
            new = nn.BatchNorm2d(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats)
            for key in ("weight", "bias"):
                if getattr(m, key) is not None:
                    getattr(new, key).data = getattr(m, key).detach()[keep].clone()
            if m.track_running_stats:
                new.running_mean.copy_(m.running_mean[keep])
                new.running_var.copy_(m.running_var[keep])
                new.num_batches_tracked.copy_(m.num_batches_tracked)
            setattr(parent, attr, new)
        elif isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d)) and keep is not None:
            raise ValueError(f"channel pruning supports batch norm or none, not {type(m).__name__}")
        elif isinstance(m, nn.Linear):
            if keep is not None:
                n_in = m.in_features
                spatial = n_in // _channels_before(leaves, i)
                cols = (keep[:, None] * spatial + torch.arange(spatial)).flatten()
                new = nn.Linear(len(cols), m.out_features, bias=m.bias is not None)
                new.weight.data = m.weight.detach()[:, cols].clone()
                if m.bias is not None:
                    new.bias.data = m.bias.detach().clone()
                setattr(parent, attr, new)
            break  # the dense head is left whole
    return model


def _channels_before(leaves, index: int) -> int:
    """Output channels of the last Conv2d before leaf ``index`` (before it was rebuilt)."""
    from torch import nn

    for _, _, m in reversed(leaves[:index]):
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    raise ValueError("a Linear layer follows no convolution")
