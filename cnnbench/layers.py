"""The layers models are built from, and the knobs a suite turns on them: norms, activations and pools
keyed by function name, conv blocks, spatial dropout, DropBlock on a schedule, CBAM attention and the
CIFAR ResNet basic block (with stochastic depth)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnbench.registry import Registry

NORMS = Registry("norm")
ACTIVATIONS = Registry("activation")
POOLS = Registry("pool")


# ───────────────────────────── knobs ─────────────────────────────


# Every norm sits after a convolution and before its activation; each takes (channels, num_groups).


@NORMS.register
def none(channels: int, num_groups: int = 1) -> nn.Module:
    """No normalization."""
    return nn.Identity()


@NORMS.register
def batch(channels: int, num_groups: int = 1) -> nn.Module:
    """BatchNorm2d: statistics over the batch (depends on batch size; running stats at eval)."""
    return nn.BatchNorm2d(channels)


@NORMS.register
def group(channels: int, num_groups: int = 4) -> nn.Module:
    """GroupNorm with ``num_groups`` (reduced to gcd(num_groups, channels): 4 groups on 6 channels → 2)."""
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


@NORMS.register
def layer(channels: int, num_groups: int = 1) -> nn.Module:
    """LayerNorm over (C, H, W) of each sample: GroupNorm with one group."""
    return nn.GroupNorm(1, channels)


@NORMS.register
def instance(channels: int, num_groups: int = 1) -> nn.Module:
    """InstanceNorm2d with a learned affine: statistics per sample and channel."""
    return nn.InstanceNorm2d(channels, affine=True)


@ACTIVATIONS.register
def relu() -> nn.Module:
    """ReLU."""
    return nn.ReLU(inplace=True)


@ACTIVATIONS.register
def leaky_relu() -> nn.Module:
    """LeakyReLU, negative slope 0.01."""
    return nn.LeakyReLU(0.01, inplace=True)


@ACTIVATIONS.register
def elu() -> nn.Module:
    """ELU (alpha 1)."""
    return nn.ELU(inplace=True)


@ACTIVATIONS.register
def gelu() -> nn.Module:
    """GELU (exact erf form)."""
    return nn.GELU()


@ACTIVATIONS.register
def silu() -> nn.Module:
    """SiLU, a.k.a. swish: x·sigmoid(x)."""
    return nn.SiLU(inplace=True)


@ACTIVATIONS.register
def mish() -> nn.Module:
    """Mish: x·tanh(softplus(x))."""
    return nn.Mish(inplace=True)


@ACTIVATIONS.register
def sigmoid() -> nn.Module:
    """Logistic sigmoid, the classic: saturates, and its slope is at most 1/4 (vanishing gradients in depth)."""
    return nn.Sigmoid()


@ACTIVATIONS.register
def tanh() -> nn.Module:
    """Hyperbolic tangent: zero-centred, but saturates like the sigmoid (slope at most 1)."""
    return nn.Tanh()


# Every pool halves the feature map (2×2 windows, stride 2; an odd row or column is dropped, as
# nn.MaxPool2d does) and takes the number of channels it pools.


@POOLS.register(name="max")
def max_pool(channels: int) -> nn.Module:
    """Max pooling: the largest activation of each 2×2 window."""
    return nn.MaxPool2d(2)


@POOLS.register(name="avg")
def avg_pool(channels: int) -> nn.Module:
    """Average pooling: the mean of each 2×2 window."""
    return nn.AvgPool2d(2)


class MixedPool2d(nn.Module):
    """α·max + (1 − α)·avg over 2×2 windows (Yu et al. 2014; Lee et al. 2016). ``learned``: α = σ(w) with one
    weight per layer, trained with the net (starts at α = ½); otherwise α = ½, fixed."""

    def __init__(self, learned: bool):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1)) if learned else None

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.gate) if self.gate is not None else torch.tensor(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.to(x.dtype)
        return a * nn.functional.max_pool2d(x, 2) + (1 - a) * nn.functional.avg_pool2d(x, 2)


@POOLS.register(name="mixed")
def mixed_pool(channels: int) -> nn.Module:
    """Mixed pooling: ½·max + ½·avg of each 2×2 window."""
    return MixedPool2d(learned=False)


@POOLS.register(name="mixed_learned")
def mixed_learned_pool(channels: int) -> nn.Module:
    """Mixed pooling with a learned blend α·max + (1 − α)·avg, α = σ(w), one w per layer (starts at ½)."""
    return MixedPool2d(learned=True)


class StochasticPool2d(nn.Module):
    """Stochastic pooling (Zeiler & Fergus, 2013) over 2×2 windows. Training: one activation of each
    window, drawn with probability proportional to its value (negative values count as 0; a window of
    zeros gives 0). Evaluation: the probability-weighted average Σ pᵢ·aᵢ. Draws use torch's generator,
    so a seeded run repeats exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        h2, w2 = h // 2, w // 2
        windows = (x[:, :, :2 * h2, :2 * w2].reshape(n, c, h2, 2, w2, 2)
                   .permute(0, 1, 2, 4, 3, 5).reshape(n, c, h2, w2, 4))
        weights = windows.clamp(min=0)
        total = weights.sum(-1, keepdim=True)
        probs = torch.where(total > 0, weights / total.clamp(min=torch.finfo(x.dtype).tiny), 0.25)
        if not self.training:
            return (probs * windows).sum(-1) * (total.squeeze(-1) > 0)
        pick = torch.multinomial(probs.reshape(-1, 4).float(), 1).reshape(n, c, h2, w2, 1)
        return windows.gather(-1, pick).squeeze(-1) * (total.squeeze(-1) > 0)


@POOLS.register(name="stochastic")
def stochastic_pool(channels: int) -> nn.Module:
    """Stochastic pooling: sample in proportion to activations while training, their weighted average at evaluation."""
    return StochasticPool2d()


@POOLS.register(name="learned")
def learned_pool(channels: int) -> nn.Module:
    """Learnable pooling: a 2×2 convolution with stride 2 over each channel set (Springenberg et al., 2015)."""
    return nn.Conv2d(channels, channels, 2, stride=2)


def conv_block(cin: int, cout: int, kernel: int, padding: int, norm: str, activation: str,
               num_groups: int = 4, stride: int = 1) -> list[nn.Module]:
    """conv → norm → activation; the conv has no bias when a norm follows it."""
    has_norm = norm != "none"
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=not has_norm),
        NORMS.create(norm, channels=cout, num_groups=num_groups),
        ACTIVATIONS.create(activation),
    ]


def spatial_dropout(p: float) -> nn.Module:
    """Dropout2d (zeroes whole channels) where ``p`` > 0, else nothing."""
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


class ScheduledDropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al., 2018: drop contiguous ``block_size``² regions of a feature map, rescaling the
    rest) through ``torchvision.ops.DropBlock2d``, with the paper's linear schedule: the drop rate grows
    from 0 at the start of training to ``p`` at its last epoch (the training loop calls
    ``set_training_progress``). At evaluation it is the identity."""

    def __init__(self, p: float, block_size: int):
        super().__init__()
        from torchvision.ops import DropBlock2d

        self.target_p = p
        self.block = DropBlock2d(0.0, block_size)

    def set_training_progress(self, fraction: float) -> None:
        self.block.p = self.target_p * min(max(fraction, 0.0), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def scheduled_dropblock(p: float, block_size: int) -> nn.Module:
    return ScheduledDropBlock2d(p, block_size) if p > 0 else nn.Identity()


def set_training_progress(model: nn.Module, fraction: float) -> None:
    """Tell every scheduled regularizer in ``model`` how far training has come (0 at the start, 1 at the end)."""
    for m in model.modules():
        if isinstance(m, ScheduledDropBlock2d):
            m.set_training_progress(fraction)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018): channel attention, then spatial attention.

    Channel: a shared two-layer MLP (hidden = channels / ``reduction``, at least 1) on the average-
    and max-pooled descriptors, summed, sigmoid. Spatial: a 7×7 conv on the channel-wise mean and
    max maps, sigmoid.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: two 3×3 convs, a 1×1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, activation: str, num_groups: int,
                 dropout2d: float, cbam: bool, cbam_reduction: int, dropblock: float = 0.0, dropblock_size: int = 3,
                 drop_path: float = 0.0):
        super().__init__()
        from torchvision.ops import StochasticDepth

        bias = norm == "none"
        self.body = nn.Sequential(
            *conv_block(cin, cout, 3, 1, norm, activation, num_groups, stride=stride),
            spatial_dropout(dropout2d),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            NORMS.create(norm, channels=cout, num_groups=num_groups),
            CBAM(cout, cbam_reduction) if cbam else nn.Identity(),
            scheduled_dropblock(dropblock, dropblock_size),
        )
        # stochastic depth (Huang et al., 2016): in training, the whole residual branch of a sample is
        # dropped with probability drop_path (the survivors rescaled); at evaluation it is always there
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), NORMS.create(norm, channels=cout, num_groups=num_groups)
            )
        self.act = ACTIVATIONS.create(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop_path(self.body(x)) + self.shortcut(x))
