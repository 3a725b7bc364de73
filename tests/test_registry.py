import pytest

from cnnbench.registries import all_registries
from cnnbench.registry import Registry, UnknownNameError


def test_register_by_function_name_and_create_drops_none():
    reg = Registry("widget")

    @reg.register
    def square(x=3):
        """Square it."""
        return x * x

    assert reg.names() == ["square"]
    assert reg.create("square", x=None) == 9  # None → the factory's default
    assert reg.create("square", x=2) == 4
    assert reg.info("square")["doc"] == "Square it."


def test_unknown_name_says_did_you_mean_and_lists_available():
    reg = Registry("widget")
    reg.register(lambda: 1, name="lenet5")
    reg.register(lambda: 2, name="resnet")
    with pytest.raises(UnknownNameError) as e:
        reg.create("lenet")
    assert str(e.value) == "unknown widget 'lenet'; did you mean 'lenet5'? available: lenet5, resnet"


def test_duplicate_registration_is_an_error():
    reg = Registry("widget")
    reg.register(lambda: 1, name="a")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(lambda: 2, name="a")


def test_all_kinds_are_registered():
    regs = all_registries()
    assert set(regs) == {"dataset", "augmentation", "model", "norm", "activation", "optimizer", "schedule"}
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic"} <= set(regs["dataset"].names())
    assert {"lenet5", "mnist_net"} <= set(regs["model"].names())
    assert {"sgd", "adam"} <= set(regs["optimizer"].names())
    assert {"constant", "step", "cosine"} <= set(regs["schedule"].names())
    assert {"random_crop", "horizontal_flip", "rotation"} <= set(regs["augmentation"].names())
