"""Models keyed by function name, built from :mod:`cnnbench.layers` with its norm / activation / pool / dropout knobs.

Every factory takes ``in_channels``, ``num_classes`` and ``image_size`` so a model works on any
dataset; the flattened feature size is computed from the input shape, not hard-coded.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnbench.layers import ACTIVATIONS, POOLS, BasicBlock, conv_block, scheduled_dropblock, spatial_dropout
from cnnbench.registry import Registry

MODELS = Registry(
    "model",
    fallback=lambda name: _torchvision_fallback(name),  # defined at the end of the module
    fallback_hint="(or torchvision.<name> for any torchvision classification model, e.g. torchvision.resnet18)",
)


def _flat_features(features: nn.Module, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, image_size, image_size)).numel()


# ───────────────────────────── models ─────────────────────────────
# Knob arguments (norm, activation, dropout, dropout2d, num_groups) default to each model's own
# choice; a config that leaves a knob unset gets that default.


@MODELS.register(cpu_img_per_s=17000)
def lenet5(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    norm: str = "none",
    activation: str = "relu",
    dropout: float = 0.0,
    dropout2d: float = 0.0,
    num_groups: int = 4,
    pool: str = "max",
    head: str = "flatten",
    dropblock: float = 0.0,
    dropblock_size: int = 3,
) -> nn.Module:
    """LeNet-5: conv 6@5×5 pad 2, pool, conv 16@5×5, pool, fc 120, fc 84, fc classes (61,706 params on 28×28).

    ``head``: ``flatten`` feeds the 16×5×5 map to the fully connected layers; ``gap`` averages each of the
    16 channels over the map first (global average pooling, Lin et al. 2014), so fc 120 has 16 inputs, not 400.
    ``dropblock``: DropBlock after each conv block, at most this rate (reached linearly by the last epoch).
    """
    if head not in ("flatten", "gap"):
        raise ValueError(f"lenet5 head '{head}': use 'flatten' or 'gap'")
    features = nn.Sequential(
        *conv_block(in_channels, 6, 5, 2, norm, activation, num_groups),
        scheduled_dropblock(dropblock, dropblock_size),
        POOLS.create(pool, channels=6),
        spatial_dropout(dropout2d),
        *conv_block(6, 16, 5, 0, norm, activation, num_groups),
        scheduled_dropblock(dropblock, dropblock_size),
        POOLS.create(pool, channels=16),
        spatial_dropout(dropout2d),
        *([nn.AdaptiveAvgPool2d(1)] if head == "gap" else []),
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
    dropout2d: float = 0.0,
    num_groups: int = 4,
    pool: str = "max",
) -> nn.Module:
    """The PyTorch-examples MNIST net: conv 32@3×3, conv 64@3×3, max-pool, dropout, fc 128, dropout, fc classes.

    The examples use dropout 0.25 after pooling and 0.5 before the last layer; ``dropout``
    sets the first and the second is twice it (capped at 0.9), so the default reproduces them.
    ``dropout2d`` adds channel dropout after the first convolution.
    """
    features = nn.Sequential(
        *conv_block(in_channels, 32, 3, 0, norm, activation, num_groups),
        spatial_dropout(dropout2d),
        *conv_block(32, 64, 3, 0, norm, activation, num_groups),
        POOLS.create(pool, channels=64),
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


@MODELS.register(cpu_img_per_s=4000)
def simple_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    norm: str = "batch",
    activation: str = "relu",
    dropout: float = 0.0,
    dropout2d: float = 0.0,
    num_groups: int = 4,
    width: int = 32,
    depth: int = 3,
    pool: str = "max",
    kernel: int = 3,
) -> nn.Module:
    """``depth`` conv blocks (``kernel``×``kernel``, odd, same padding), the first ``width`` channels wide and
    doubling each block; global-average head.

    Each block is conv → norm → activation (→ Dropout2d), then a 2×2 max-pool while the map is at
    least 8 pixels wide (so 28×28 pools twice, to 7×7). The head is global average pooling, dropout
    and one linear layer, so any image size works.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"simple_cnn needs width ≥ 1 and depth ≥ 1, got width={width}, depth={depth}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"simple_cnn kernel must be odd (same padding), got {kernel}")
    layers: list[nn.Module] = []
    cin, size = in_channels, image_size
    for i in range(depth):
        cout = width * 2**i
        layers += [*conv_block(cin, cout, kernel, kernel // 2, norm, activation, num_groups), spatial_dropout(dropout2d)]
        if size >= 8:
            layers.append(POOLS.create(pool, channels=cout))
            size //= 2
        cin = cout
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
    )


@MODELS.register(cpu_img_per_s=700)
def resnet(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    norm: str = "batch",
    activation: str = "relu",
    dropout: float = 0.0,
    dropout2d: float = 0.0,
    num_groups: int = 4,
    depth: int = 20,
    width: int = 16,
    cbam: bool = False,
    cbam_reduction: int = 16,
    dropblock: float = 0.0,
    dropblock_size: int = 3,
    stochastic_depth: float = 0.0,
) -> nn.Module:
    """CIFAR-style ResNet (He et al., 2016): ``depth`` = 6n+2 (20, 32, 56, …), stages of width 16/32/64.

    A 3×3 stem, three stages of n basic blocks (stride 2 at the start of stages 2 and 3, 1×1
    projection shortcuts), global average pooling, dropout, linear. ``cbam: true`` puts a CBAM
    attention module at the end of every block's residual branch. ResNet-20 has 0.27 M parameters.
    ``dropblock``: DropBlock at the end of the residual branches of stages 2 and 3 (as Ghiasi et al. put it in
    the later groups), its rate rising linearly to this by the last epoch. ``stochastic_depth``: the last
    block's drop probability; block l of L drops its branch with probability l/L of it (the linear decay rule).
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    if not 0 <= stochastic_depth < 1:
        raise ValueError(f"resnet stochastic_depth must be in [0, 1), got {stochastic_depth}")
    n = (depth - 2) // 6
    layers: list[nn.Module] = list(conv_block(in_channels, width, 3, 1, norm, activation, num_groups))
    cin, blocks = width, 3 * n
    for stage in range(3):
        cout = width * 2**stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            index = stage * n + i + 1  # 1 … blocks
            layers.append(BasicBlock(cin, cout, stride, norm, activation, num_groups, dropout2d, cbam, cbam_reduction,
                                     dropblock=dropblock if stage > 0 else 0.0, dropblock_size=dropblock_size,
                                     drop_path=stochastic_depth * index / blocks))
            cin = cout
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
    )


# ─────────────────────── torchvision models by name ───────────────────────

TORCHVISION_PREFIX = "torchvision."


class _TorchvisionAdapter(nn.Module):
    """Feeds a torchvision ImageNet-style model: grey images repeated to 3 channels, optional resize."""

    def __init__(self, net: nn.Module, in_channels: int, input_size: int | None):
        super().__init__()
        self.net, self.repeat, self.input_size = net, in_channels == 1, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(x)


def _load_pretrained(net: nn.Module, weights_path: str, name: str) -> None:
    """Load a local state dict (``weights_only=True``); a classifier of another size is left freshly initialized."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = net.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{weights_path}: not a state dict of {name} (unexpected keys {unknown[:3]}…)")
    mismatched = [k for k, v in state.items() if v.shape != own[k].shape]
    last_linear = [m for m in net.modules() if isinstance(m, nn.Linear)][-1:]
    # the classifier is the last Linear: a different num_classes changes only its shapes
    names = {id(p): k for k, p in net.named_parameters()}
    classifier = {names[id(p)] for m in last_linear for p in m.parameters()}
    wrong = [k for k in mismatched if k not in classifier]
    if wrong:
        raise ValueError(f"{weights_path}: shapes differ from {name} at {wrong[:3]}")
    net.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=not mismatched)


def _torchvision_factory(arch: str):
    def factory(in_channels: int = 3, num_classes: int = 10, image_size: int = 224,
                weights_path: str | None = None, input_size: int | None = None, **kwargs) -> nn.Module:
        """A torchvision classification model, randomly initialized or loaded from a local state dict.

        Grey inputs are repeated to three channels; ``input_size`` resizes inputs for models that
        need a minimum size (e.g. 75 for inception_v3). Other ``model.kwargs`` go to the builder.
        """
        import torchvision.models

        if in_channels not in (1, 3):
            raise ValueError(f"torchvision models take 1- or 3-channel images, the dataset has {in_channels}")
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        if weights_path is not None:
            _load_pretrained(net, weights_path, arch)
        return _TorchvisionAdapter(net, in_channels, input_size)

    factory.__doc__ = f"torchvision.models.{arch} (random init, or weights_path to a local state dict)"
    return factory


def _torchvision_fallback(name: str):
    if not name.startswith(TORCHVISION_PREFIX):
        return None
    import torchvision.models

    arch = name[len(TORCHVISION_PREFIX):]
    return _torchvision_factory(arch) if arch in torchvision.models.list_models(module=torchvision.models) else None


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
        dropout2d=config.dropout2d,
        num_groups=config.num_groups,
        pool=config.pool,
        **config.kwargs,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
