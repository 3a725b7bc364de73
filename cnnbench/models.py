"""Models keyed by function name, with the norm / activation / dropout knobs.

Every factory takes ``in_channels``, ``num_classes`` and ``image_size`` so a model works on any
dataset; the flattened feature size is computed from the input shape, not hard-coded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnbench.registry import Registry

MODELS = Registry(
    "model",
    fallback=lambda name: _torchvision_fallback(name),  # defined at the end of the module
    fallback_hint="(or torchvision.<name> for any torchvision classification model, e.g. torchvision.resnet18)",
)
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


def _spatial_dropout(p: float) -> nn.Module:
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


def _dropblock(p: float, block_size: int) -> nn.Module:
    return ScheduledDropBlock2d(p, block_size) if p > 0 else nn.Identity()


def set_training_progress(model: nn.Module, fraction: float) -> None:
    """Tell every scheduled regularizer in ``model`` how far training has come (0 at the start, 1 at the end)."""
    for m in model.modules():
        if isinstance(m, ScheduledDropBlock2d):
            m.set_training_progress(fraction)


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
        _dropblock(dropblock, dropblock_size),
        POOLS.create(pool, channels=6),
        _spatial_dropout(dropout2d),
        *conv_block(6, 16, 5, 0, norm, activation, num_groups),
        _dropblock(dropblock, dropblock_size),
        POOLS.create(pool, channels=16),
        _spatial_dropout(dropout2d),
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
        _spatial_dropout(dropout2d),
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
        layers += [*conv_block(cin, cout, kernel, kernel // 2, norm, activation, num_groups), _spatial_dropout(dropout2d)]
        if size >= 8:
            layers.append(POOLS.create(pool, channels=cout))
            size //= 2
        cin = cout
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
    )


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
            _spatial_dropout(dropout2d),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            NORMS.create(norm, channels=cout, num_groups=num_groups),
            CBAM(cout, cbam_reduction) if cbam else nn.Identity(),
            _dropblock(dropblock, dropblock_size),
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
