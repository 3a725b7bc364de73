"""Model families: parameter counts, knobs, CBAM, torchvision models by name and local pretrained weights."""

import pytest
import torch
from torch import nn

from cnnbench.config import Experiment
from cnnbench.layers import CBAM
from cnnbench.models import MODELS, build, count_params


def make(name, **kw):
    return MODELS.create(name, in_channels=1, num_classes=10, image_size=28, **kw)


@pytest.mark.parametrize("depth, blocks", [(20, 9), (32, 15), (56, 27)])
def test_resnet_depth_is_6n_plus_2_with_n_blocks_per_stage(depth, blocks):
    model = make("resnet", depth=depth)
    n_blocks = sum(type(m).__name__ == "BasicBlock" for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert n_blocks == blocks
    assert len(convs) + 1 == depth  # 3×3 convs plus the final linear layer
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet20_parameter_count_and_bad_depth():
    assert 0.26e6 < count_params(make("resnet")) < 0.28e6  # the paper's 0.27 M
    with pytest.raises(ValueError, match="6n\\+2"):
        make("resnet", depth=21)


def test_cbam_sits_in_every_block_and_gates_channels_and_positions():
    model = make("resnet", cbam=True)
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 9
    cbam = CBAM(16, reduction=4)
    x = torch.randn(2, 16, 7, 7)
    y = cbam(x)
    assert y.shape == x.shape
    gate = y / x  # both sigmoid gates multiply: strictly between 0 and 1 everywhere
    assert (gate > 0).all() and (gate < 1).all()
    assert gate.std() > 0  # not a constant scale


@pytest.mark.parametrize("width, depth, channels", [(8, 1, [8]), (16, 3, [16, 32, 64]), (4, 5, [4, 8, 16, 32, 64])])
def test_simple_cnn_width_and_depth(width, depth, channels):
    model = make("simple_cnn", width=width, depth=depth)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == channels
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unset_knobs_take_each_models_own_default():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build(Experiment(model={"name": "lenet5"}).model, 1, 10, 28).modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in build(Experiment(model={"name": "resnet"}).model, 1, 10, 28).modules())
    drops = [m.p for m in build(Experiment(model={"name": "mnist_net"}).model, 1, 10, 28).modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.25, 0.5]  # the PyTorch example's values, not overridden by an unset knob


@pytest.mark.parametrize("name", ["lenet5", "mnist_net", "simple_cnn", "resnet"])
def test_dropout2d_zeroes_whole_channels_in_training_only(name):
    model = build(Experiment(model={"name": name, "dropout2d": 0.5}).model, 1, 10, 28)
    d2 = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert d2 and all(m.p == 0.5 for m in d2)
    x = torch.ones(4, 6, 5, 5)
    out = d2[0].train()(x)
    per_channel = out.flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 2).all(-1)).all()  # a channel is dropped whole or scaled
    assert torch.equal(d2[0].eval()(x), x)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "squeezenet1_1"])
def test_torchvision_models_by_name_train_on_grey_28px(arch):
    torch.manual_seed(0)
    model = make(f"torchvision.{arch}", **({"input_size": 64} if arch == "squeezenet1_1" else {}))
    out = model(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10)
    out.sum().backward()


def test_torchvision_pretrained_weights_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pt"
    torch.save(imagenet.state_dict(), path)
    model = make("torchvision.resnet18", weights_path=str(path)).net
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.out_features == 10  # the 1000-class head is replaced, the backbone kept

    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a state dict of resnet18"):
        make("torchvision.resnet18", weights_path=str(path))

    torch.save({"conv1.weight": torch.zeros(3)}, path)  # a backbone tensor of the wrong shape is refused
    with pytest.raises(ValueError, match="shapes differ from resnet18 at \\['conv1.weight'\\]"):
        make("torchvision.resnet18", weights_path=str(path))

    torch.save({"obj": object()}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        make("torchvision.resnet18", weights_path=str(tmp_path / "pickled.pt"))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh"])
@pytest.mark.parametrize("name", ["lenet5", "mnist_net", "simple_cnn", "resnet"])
def test_every_activation_trains_in_every_model(name, activation):
    torch.manual_seed(0)
    model = MODELS.create(name, activation=activation)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_sigmoid_passes_far_less_gradient_to_the_first_layer_of_a_deep_net_than_relu():
    """Why ReLU replaced it: the sigmoid's slope is at most 1/4, so the gradient shrinks layer by layer (14× less
    than ReLU's here at initialization; tanh, slope ≤ 1, about as much as ReLU — its trouble is saturation later)."""
    def first_layer_grad(activation: str) -> float:
        torch.manual_seed(0)
        model = MODELS.create("simple_cnn", activation=activation, width=16, depth=5)
        x, y = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10
        torch.nn.functional.cross_entropy(model(x), y).backward()
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        return first.weight.grad.abs().mean().item()

    relu, sigmoid = first_layer_grad("relu"), first_layer_grad("sigmoid")
    assert sigmoid < relu / 10
