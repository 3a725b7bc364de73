"""``low_rank: {rank_ratio | energy, conv, finetune_epochs}``: low-rank factorization — each Linear and
(ungrouped) Conv2d of a trained model becomes two thinner layers from a truncated SVD of its weight.

Method card. *What*: W ≈ U_r S_r V_r^T, split as (U_r √S_r)(√S_r V_r^T) into two layers. Convs are
factored per channel (a k×k conv to r channels, then a 1×1 conv) or spatially (Jaderberg et al. 2014,
scheme 2: a k×1 conv to r channels, then a 1×k conv). *When it helps*: layers whose weights have
fast-decaying singular values (large dense heads, wide convs); the pair has r·(m+n) weights instead of
m·n, so it only pays when r is well below m·n/(m+n). *Cost*: accuracy (the discarded energy),
recovered in part by fine-tuning; one more kernel launch per layer.

Importing this module does not import torch (the report side of the tool stays torch-free): torch is
imported inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import Field, NonNegativeInt, model_validator

from cnnbench.settings import Strict
from cnnbench.techniques.base import Technique, register

if TYPE_CHECKING:  # for annotations only: never executed, so torch is not imported at run time
    import torch
    from torch import nn

CONV_SCHEMES = ("channel", "spatial")


class LowRankConfig(Strict):
    """Low-rank factorization of a trained model's Linear and Conv2d layers by truncated SVD."""

    rank_ratio: float | None = Field(None, gt=0.0, le=1.0, description="rank kept in every layer, as a fraction of "
                                                                        "its full rank")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="instead of rank_ratio: per layer, the smallest "
                                                                   "rank keeping this fraction of the squared singular values")
    conv: Literal["channel", "spatial"] = Field(
        "channel", description="channel: a k×k conv to r channels, then 1×1; spatial: k×1 to r channels, then 1×k")
    finetune_epochs: NonNegativeInt = Field(0, description="epochs of fine-tuning the factorized model")

    @model_validator(mode="after")
    def _one_rank_rule(self) -> LowRankConfig:
        if (self.rank_ratio is None) == (self.energy is None):
            raise ValueError("give exactly one of rank_ratio (e.g. 0.25) and energy (e.g. 0.9)")
        return self


@register
class LowRank(Technique):
    """First of the post-training techniques: a factorized model can then be pruned or quantized."""

    name, stage, block, order = "low_rank", "post_training", LowRankConfig, 10
    summary = "factor Linear/Conv2d layers into thinner pairs by truncated SVD (rank ratio or energy kept)"

    def finetune_epochs(self, exp) -> int:
        return exp.low_rank.finetune_epochs

    def describe(self, exp) -> str:
        c = exp.low_rank
        rule = f"rank {c.rank_ratio:g} of full" if c.rank_ratio is not None else f"{c.energy:.0%} of the energy"
        convs = "k×k → r → 1×1" if c.conv == "channel" else "k×1 → r → 1×k"
        epochs = f"{c.finetune_epochs} fine-tune epoch{'s' if c.finetune_epochs != 1 else ''}"
        return f"low-rank SVD ({rule}; convs {convs}; {epochs})"

    def apply(self, exp, model, context):
        c = exp.low_rank
        layers = factorize(model, rank_ratio=c.rank_ratio, energy=c.energy, conv=c.conv)
        totals = summary(layers)
        context.metrics.update(low_rank_params_before=totals["params_before"],
                               low_rank_params_after=totals["params_after"],
                               low_rank_layers=totals["layers_factorized"],
                               low_rank_energy_kept=totals["energy_kept_mean"])
        context.artifacts["low_rank.json"] = layers
        context.finetune(model, c.finetune_epochs)
        return model


def _check_fractions(rank_ratio: float | None, energy: float | None) -> None:
    """Exactly one of ``rank_ratio`` and ``energy``, in (0, 1]."""
    if (rank_ratio is None) == (energy is None):
        raise ValueError(f"give exactly one of rank_ratio and energy (got rank_ratio={rank_ratio}, energy={energy})")
    name, value = ("rank_ratio", rank_ratio) if rank_ratio is not None else ("energy", energy)
    if not 0 < value <= 1:  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _squares(singular_values: Iterable[float]) -> list[float]:
    values = singular_values.tolist() if hasattr(singular_values, "tolist") else singular_values
    return [float(v) ** 2 for v in values]


def choose_rank(singular_values: Iterable[float], rank_ratio: float | None = None, energy: float | None = None) -> int:
    """The rank to keep, from singular values in descending order (a list or a 1-D tensor).

    ``rank_ratio``: that fraction of the full rank, rounded up and at least 1 (so every layer keeps
    something). ``energy``: the smallest rank whose squared singular values reach that fraction of the
    total (the squared Frobenius norm of the weight), i.e. the relative error of the truncation is
    at most sqrt(1 - energy). A zero matrix has no energy to keep and gets rank 1."""
    _check_fractions(rank_ratio, energy)
    squares = _squares(singular_values)
    full = len(squares)
    if full == 0:
        raise ValueError("singular_values is empty")
    if rank_ratio is not None:
        return min(full, max(1, math.ceil(rank_ratio * full - 1e-9)))  # 1e-9: 0.07 * 100 is 7.000000000000001
    total = sum(squares)
    if total == 0:
        return 1
    kept = 0.0
    for r, sq in enumerate(squares, 1):
        kept += sq
        if kept >= energy * total * (1 - 1e-12):
            return r
    return full


def energy_kept(singular_values: Iterable[float], rank: int) -> float:
    """Fraction of the squared singular values (the weight's squared Frobenius norm) the first ``rank`` keep."""
    squares = _squares(singular_values)
    total = sum(squares)
    return sum(squares[:rank]) / total if total > 0 else 1.0


def _scheme(layer: nn.Module, conv: str) -> str:
    """'linear', 'conv_channel' or 'conv_spatial'; spatial needs a kernel taller and wider than 1."""
    from torch import nn

    if isinstance(layer, nn.Linear):
        return "linear"
    if conv == "spatial" and min(layer.kernel_size) > 1:
        return "conv_spatial"
    return "conv_channel"


def _matrix(layer: nn.Module, scheme: str) -> torch.Tensor:
    """The weight as the matrix the scheme decomposes, in float64 on the CPU (accurate, and any device)."""
    import torch

    w = layer.weight.detach().to("cpu", torch.float64)
    if scheme == "conv_spatial":  # rows (i, y), columns (o, x)
        return w.permute(1, 2, 0, 3).reshape(w.shape[1] * w.shape[2], w.shape[0] * w.shape[3])
    return w.reshape(w.shape[0], -1)  # Linear (out, in); channel conv (out, in·kh·kw)


def _svd(layer: nn.Module, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    return torch.linalg.svd(_matrix(layer, scheme), full_matrices=False)


def _build(layer: nn.Module, scheme: str, svd, rank: int) -> nn.Sequential:
    """The two-layer replacement of ``layer`` keeping the first ``rank`` singular triplets of ``svd``."""
    import torch
    from torch import nn

    u, s, vh = svd
    if not 1 <= rank <= len(s):
        raise ValueError(f"rank must be in [1, {len(s)}] for this layer, got {rank}")
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]  # matrix ≈ left @ right
    w, bias = layer.weight, layer.bias
    like = {"device": w.device, "dtype": w.dtype}
    if scheme == "linear":
        first = nn.Linear(layer.in_features, rank, bias=False, **like)
        second = nn.Linear(rank, layer.out_features, bias=bias is not None, **like)
        first_w, second_w = right, left
    else:
        out_ch, in_ch, kh, kw = w.shape
        (sh, sw), (dh, dw), mode = layer.stride, layer.dilation, layer.padding_mode
        pad = layer.padding
        if scheme == "conv_channel":
            first = nn.Conv2d(in_ch, rank, (kh, kw), layer.stride, pad, layer.dilation, bias=False,
                              padding_mode=mode, **like)
            second = nn.Conv2d(rank, out_ch, 1, bias=bias is not None, **like)
            first_w, second_w = right.reshape(rank, in_ch, kh, kw), left.reshape(out_ch, rank, 1, 1)
        else:  # 'same'/'valid' split per axis as they are; numbers go to the axis each conv spans
            pad1, pad2 = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
            first = nn.Conv2d(in_ch, rank, (kh, 1), (sh, 1), pad1, (dh, 1), bias=False, padding_mode=mode, **like)
            second = nn.Conv2d(rank, out_ch, (1, kw), (1, sw), pad2, (1, dw), bias=bias is not None,
                               padding_mode=mode, **like)
            first_w = left.T.reshape(rank, in_ch, kh, 1)  # V[k, i, y, 0] = √s_k · a_k[(i, y)]
            second_w = right.reshape(rank, out_ch, kw).permute(1, 0, 2).reshape(out_ch, rank, 1, kw)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias is not None:
            second.bias.copy_(bias.detach())
    first.weight.requires_grad_(w.requires_grad)
    second.weight.requires_grad_(w.requires_grad)
    if bias is not None:
        second.bias.requires_grad_(bias.requires_grad)
    return nn.Sequential(first, second).train(layer.training)


def factor_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Linear(in, out) → Linear(in, rank, no bias), Linear(rank, out, original bias), whatever the
    parameter count (``factorize`` decides whether it pays)."""
    return _build(layer, "linear", _svd(layer, "linear"), rank)


def factor_conv(layer: nn.Conv2d, rank: int, conv: str = "channel") -> nn.Sequential:
    """Conv2d → two convs of ``rank`` channels between them, by the ``conv`` scheme ('channel' or
    'spatial'; spatial falls back to channel for kernels 1 tall or 1 wide), whatever the parameter count."""
    if conv not in CONV_SCHEMES:
        raise ValueError(f"conv must be one of {CONV_SCHEMES}, got {conv!r}")
    if layer.groups != 1:
        raise ValueError(f"grouped convolutions (groups={layer.groups}) are not factorized")
    scheme = _scheme(layer, conv)
    return _build(layer, scheme, _svd(layer, scheme), rank)


def factorize(model: nn.Module, *, rank_ratio: float | None = None, energy: float | None = None,
              conv: str = "channel") -> dict[str, dict]:
    """Replace, in place, every ``nn.Linear`` and ungrouped ``nn.Conv2d`` of ``model`` (at any depth,
    whatever the forward of the blocks holding them) by its two-layer factorization, when that has
    fewer parameters. The rank of each layer comes from ``choose_rank``.

    Returns a record per layer, keyed by its qualified name: kind ('linear', 'conv_channel',
    'conv_spatial' or 'kept'), rank, full_rank, energy_kept, params_before, params_after; kept layers
    also have a 'reason' and describe the layer as it stays (rank = full_rank, energy_kept 1.0; both
    ranks None where no SVD was done). Subclasses of Linear/Conv2d are kept: their owners may read
    ``.weight`` directly (MultiheadAttention's out_proj), so a replacement could break them."""
    from torch import nn

    if conv not in CONV_SCHEMES:
        raise ValueError(f"conv must be one of {CONV_SCHEMES}, got {conv!r}")
    _check_fractions(rank_ratio, energy)
    records: dict[str, dict] = {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        before = sum(p.numel() for p in layer.parameters())
        kept = {"kind": "kept", "rank": None, "full_rank": None, "energy_kept": 1.0,
                "params_before": before, "params_after": before}
        if type(layer) not in (nn.Linear, nn.Conv2d):
            records[name] = {**kept, "reason": f"{type(layer).__name__} is a subclass; its owner may use its weight"}
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            records[name] = {**kept, "reason": f"grouped convolution (groups={layer.groups})"}
            continue
        if not name:
            records[name] = {**kept, "reason": "the model itself cannot be replaced in place"}
            continue
        scheme = _scheme(layer, conv)
        svd = _svd(layer, scheme)
        s = svd[1]
        full, r = len(s), choose_rank(s, rank_ratio, energy)
        rows, cols = svd[0].shape[0], svd[2].shape[1]
        after = r * (rows + cols) + (0 if layer.bias is None else layer.bias.numel())
        if after >= before:
            records[name] = {**kept, "rank": full, "full_rank": full,
                             "reason": f"rank {r} of {full} needs {after} parameters, not fewer than {before}"}
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, _build(layer, scheme, svd, r))
        records[name] = {"kind": scheme, "rank": r, "full_rank": full, "energy_kept": energy_kept(s, r),
                         "params_before": before, "params_after": after}
    return records


def summary(layers: dict[str, dict]) -> dict[str, float]:
    """Totals over a ``factorize`` record, as MLflow metrics: parameters of the Linear/Conv2d layers
    before and after, their ratio, layers factorized and kept, and the mean energy kept over the
    factorized layers (NaN when none was)."""
    done = [rec for rec in layers.values() if rec["kind"] != "kept"]
    before = sum(rec["params_before"] for rec in layers.values())
    after = sum(rec["params_after"] for rec in layers.values())
    return {
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before if before else math.nan,
        "layers_factorized": len(done),
        "layers_kept": len(layers) - len(done),
        "energy_kept_mean": sum(rec["energy_kept"] for rec in done) / len(done) if done else math.nan,
    }
