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
    assert set(regs) == {"dataset", "augmentation", "model", "norm", "activation", "pool", "optimizer", "schedule"}
    assert {"max", "avg", "mixed", "mixed_learned", "stochastic", "learned"} == set(regs["pool"].names())
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic"} <= set(regs["dataset"].names())
    assert {"lenet5", "mnist_net"} <= set(regs["model"].names())
    assert {"sgd", "adam"} <= set(regs["optimizer"].names())
    assert {"constant", "step", "cosine"} <= set(regs["schedule"].names())
    assert {"random_crop", "horizontal_flip", "rotation"} <= set(regs["augmentation"].names())


def test_optimizer_and_schedule_names_are_found_in_any_case_and_by_torch_class_name():
    import torch

    from cnnbench.config import OptimizerConfig, ScheduleConfig
    from cnnbench.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler

    model = torch.nn.Linear(2, 2)
    for name, cls in (("Adam", torch.optim.Adam), ("ADAMW", torch.optim.AdamW), ("adadelta", torch.optim.Adadelta),
                      ("nadam", torch.optim.NAdam), ("RAdam", torch.optim.RAdam), ("SGD", torch.optim.SGD)):
        assert name in OPTIMIZERS
        assert type(build_optimizer(OptimizerConfig(name=name, lr=0.1), model)) is cls
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for name, cls, interval in (("CosineAnnealingLR", torch.optim.lr_scheduler.CosineAnnealingLR, "epoch"),
                                ("Cosine", torch.optim.lr_scheduler.CosineAnnealingLR, "epoch"),
                                ("steplr", torch.optim.lr_scheduler.StepLR, "epoch"),
                                ("OneCycleLR", torch.optim.lr_scheduler.OneCycleLR, "batch"),
                                ("ReduceLROnPlateau", torch.optim.lr_scheduler.ReduceLROnPlateau, "plateau")):
        scheduler, when = build_scheduler(ScheduleConfig(name=name), optimizer, 3, 10)
        assert type(scheduler) is cls and when == interval
    assert "adamm" not in OPTIMIZERS and "CosineLR" not in SCHEDULES
    assert "did you mean 'adam'" in OPTIMIZERS.unknown_message("adamm")
    assert "LeNet5" not in all_registries()["model"]  # other kinds stay exact: their names are cnnbench's own
