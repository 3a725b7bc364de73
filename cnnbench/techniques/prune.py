"""Pruning with ``torch.nn.utils.prune`` (masks made permanent before anything is measured), and
channel pruning that rebuilds smaller Conv/Linear layers.

Method card. *What*: zero the smallest weights (unstructured), whole output channels (ln_structured),
or remove output channels (channel). *When it helps*: unstructured sparsity shrinks a model only
when stored sparse or compressed and does not speed dense kernels; removing channels makes every
later layer smaller, so dense inference gets faster. *Cost*: accuracy, recovered in part by
fine-tuning (iterative pruning alternates small steps and fine-tuning).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv2d and Linear layers (their ``weight`` is pruned; biases and norms are left alone)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def apply_masks(model: nn.Module, method: str, amount: float) -> None:
    """Add (or compose with existing) pruning masks that remove ``amount`` of the remaining weights."""
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


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` on every pruned layer: ``weight`` becomes a plain parameter holding the zeros,
    ``weight_orig`` and the mask (and the forward pre-hook) are gone."""
    for _, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def step_amount(amount: float, steps: int) -> float:
    """Per-step fraction of the remaining weights so that ``steps`` steps remove ``amount`` in all
    (each prune call on a pruned layer acts on the weights still unpruned)."""
    return 1.0 - (1.0 - amount) ** (1.0 / steps)


def sparsity(model: nn.Module) -> dict[str, float]:
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


def _leaves(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every leaf in forward order, for nested ``nn.Sequential`` models."""
    out = []

    def walk(parent: nn.Module) -> None:
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


def prune_channels(model: nn.Module, amount: float) -> nn.Module:
    """Remove ``amount`` of the output channels of every Conv2d (those with the smallest L1 filter norm,
    chosen by ``prune.ln_structured``), rebuilding the conv, its norm, and the next conv or the first
    Linear after the flatten with fewer inputs. Works in place on nested ``nn.Sequential`` models
    whose layers run in order (lenet5, mnist_net, simple_cnn); anything else raises ``ValueError``."""
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
    for _, _, m in reversed(leaves[:index]):
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    raise ValueError("a Linear layer follows no convolution")
