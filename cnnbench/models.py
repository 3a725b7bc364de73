"""Models keyed by function name, with the norm / activation / dropout knobs.

Every factory takes ``in_channels``, ``num_classes`` and ``image_size`` so a model works on any
dataset; the flattened feature size is computed from the input shape, not hard-coded.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnbench.registry import Registry

MODELS = Registry("model")
NORMS = Registry("norm")
ACTIVATIONS = Registry("activation")


# ───────────────────────────── knobs ─────────────────────────────


@NORMS.register
def none(channels: int) -> nn.Module:
    """No normalization."""
    return nn.Identity()


@NORMS.register
def batch(channels: int) -> nn.Module:
    """BatchNorm2d after each convolution (before the activation)."""
    return nn.BatchNorm2d(channels)


@ACTIVATIONS.register
def relu() -> nn.Module:
    """ReLU."""
    return nn.ReLU(inplace=True)


@ACTIVATIONS.register
def gelu() -> nn.Module:
    """GELU (exact erf form)."""
    return nn.GELU()


def conv_block(cin: int, cout: int, kernel: int, padding: int, norm: str, activation: str) -> list[nn.Module]:
    """conv → norm → activation; the conv has no bias when a norm follows it."""
    has_norm = norm != "none"
    return [
        nn.Conv2d(cin, cout, kernel, padding=padding, bias=not has_norm),
        NORMS.create(norm, channels=cout),
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
) -> nn.Module:
    """LeNet-5: conv 6@5×5 pad 2, pool, conv 16@5×5, pool, fc 120, fc 84, fc classes (61,706 params on 28×28)."""
    features = nn.Sequential(
        *conv_block(in_channels, 6, 5, 2, norm, activation),
        nn.MaxPool2d(2),
        *conv_block(6, 16, 5, 0, norm, activation),
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
) -> nn.Module:
    """The PyTorch-examples MNIST net: conv 32@3×3, conv 64@3×3, max-pool, dropout, fc 128, dropout, fc classes.

    The examples use dropout 0.25 after pooling and 0.5 before the last layer; ``dropout``
    sets the first and the second is twice it (capped at 0.9), so the default reproduces them.
    """
    features = nn.Sequential(
        *conv_block(in_channels, 32, 3, 0, norm, activation),
        *conv_block(32, 64, 3, 0, norm, activation),
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
        **config.kwargs,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
