"""Models keyed by function name, with the norm / activation / dropout knobs.

Every factory takes ``in_channels``, ``num_classes`` and ``image_size`` so a model works on any
dataset; the flattened feature size is computed from the input shape, not hard-coded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnbench.registry import Registry

MODELS = Registry("model")
NORMS = Registry("norm")
ACTIVATIONS = Registry("activation")


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


def conv_block(cin: int, cout: int, kernel: int, padding: int, norm: str, activation: str,
               num_groups: int = 4) -> list[nn.Module]:
    """conv → norm → activation; the conv has no bias when a norm follows it."""
    has_norm = norm != "none"
    return [
        nn.Conv2d(cin, cout, kernel, padding=padding, bias=not has_norm),
        NORMS.create(norm, channels=cout, num_groups=num_groups),
        ACTIVATIONS.create(activation),
    ]


def _flat_features(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, image_size, image_size)).numel()


# ───────────────────────────── models ─────────────────────────────


@MODELS.register(cpu_img_per_s=17000)
def lenet5(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    norm: str = "none",
    activation: str = "relu",
    dropout: float = 0.0,
    num_groups: int = 4,
) -> nn.Module:
    """LeNet-5: conv 6@5×5 pad 2, pool, conv 16@5×5, pool, fc 120, fc 84, fc classes (61,706 params on 28×28)."""
    features = nn.Sequential(
        *conv_block(in_channels, 6, 5, 2, norm, activation, num_groups),
        nn.MaxPool2d(2),
        *conv_block(6, 16, 5, 0, norm, activation, num_groups),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    n = _flat_features(features, in_channels, image_size)
    return nn.Sequential(
        features,
        nn.Linear(n, 120),
        ACTIVATIONS.create(activation),
        nn.Dropout(dropout),
        nn.Linear(120, 84),
        ACTIVATIONS.create(activation),
        nn.Dropout(dropout),
        nn.Linear(84, num_classes),
    )


@MODELS.register(cpu_img_per_s=1400)
def mnist_net(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    norm: str = "none",
    activation: str = "relu",
    dropout: float = 0.25,
    num_groups: int = 4,
) -> nn.Module:
    """The PyTorch-examples MNIST net: conv 32@3×3, conv 64@3×3, max-pool, dropout, fc 128, dropout, fc classes.

    The examples use dropout 0.25 after pooling and 0.5 before the last layer; ``dropout``
    sets the first and the second is twice it (capped at 0.9), so the default reproduces them.
    """
    features = nn.Sequential(
        *conv_block(in_channels, 32, 3, 0, norm, activation, num_groups),
        *conv_block(32, 64, 3, 0, norm, activation, num_groups),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
        nn.Flatten(),
    )
    n = _flat_features(features, in_channels, image_size)
    return nn.Sequential(
        features,
        nn.Linear(n, 128),
        ACTIVATIONS.create(activation),
        nn.Dropout(min(2 * dropout, 0.9)),
        nn.Linear(128, num_classes),
    )


def build(config, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build the model a :class:`~cnnbench.config.ModelConfig` describes."""
    return MODELS.create(
        config.name,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        norm=config.norm,
        activation=config.activation,
        dropout=config.dropout,
        num_groups=config.num_groups,
        **config.kwargs,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
