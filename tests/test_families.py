"""Every registered optimizer, schedule and regularization knob, and the documented LR curves."""

import math

import pytest
import torch

from cnnbench.config import Experiment, OptimizerConfig, ScheduleConfig
from cnnbench.models import MODELS
from cnnbench.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler, param_groups
from cnnbench.registry import UnknownNameError
from cnnbench.train import train
from tests.test_models_data import _experiment, _split


def _lenet(norm="batch"):
    return MODELS.create("lenet5", norm=norm)


@pytest.mark.parametrize("name", [*OPTIMIZERS.names(), "NAdam", "RAdam"])
def test_every_optimizer_steps(name):
    torch.manual_seed(0)
    model = _lenet()
    opt = build_optimizer(OptimizerConfig(name=name, lr=0.01, weight_decay=1e-4), model)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8)).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_optimizer_mentions_torch_optim():
    assert "Adamax" in OPTIMIZERS and "adamx" not in OPTIMIZERS
    with pytest.raises(UnknownNameError, match="unknown optimizer 'adamx'; did you mean 'adam'?.*any torch.optim class"):
        OPTIMIZERS.get("adamx")


def test_weight_decay_skips_biases_and_norm_parameters_by_default():
    model = _lenet("batch")
    decay, no_decay = param_groups(model, 5e-4, decay_norm_and_bias=False)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert {id(p) for p in decay["params"]} == {id(p) for p in weights}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert any(p is bn.weight for p in no_decay["params"])
    [everything] = param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(model.parameters()))


def lr_curve(name: str, epochs: int = 6, steps: int = 4, val_losses=None, **cfg) -> list[float]:
    """The LR of every optimizer step, stepping the scheduler as the training loop does."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched, interval = build_scheduler(ScheduleConfig(name=name, **cfg), opt, epochs, steps)
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if interval == "batch":
                sched.step()
        if interval == "epoch":
            sched.step()
        elif interval == "plateau":
            sched.step(val_losses[epoch])
    return lrs


def per_epoch(lrs, steps=4):
    return [round(x, 6) for x in lrs[::steps]]


def test_epoch_schedules_follow_their_documented_curves():
    assert per_epoch(lr_curve("constant")) == [1.0] * 6
    assert per_epoch(lr_curve("step", step_size=2, gamma=0.1)) == [1, 1, 0.1, 0.1, 0.01, 0.01]
    assert per_epoch(lr_curve("multistep", milestones=[1, 4], gamma=0.5)) == [1, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert per_epoch(lr_curve("exponential", gamma=0.5)) == [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    cos = per_epoch(lr_curve("cosine", min_lr=0.0))
    assert cos == [round(0.5 * (1 + math.cos(math.pi * e / 6)), 6) for e in range(6)]


def test_batch_schedules_warm_up_then_decay():
    lrs = lr_curve("warmup_cosine", epochs=5, steps=4, warmup_epochs=1, min_lr=0.0)  # 4 warm-up steps of 20
    assert lrs[:6] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 16))])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.02
    one = lr_curve("onecycle", epochs=5, steps=4, pct_start=0.3)
    peak = max(range(len(one)), key=one.__getitem__)
    assert one[peak] == pytest.approx(1.0) and 4 <= peak <= 6  # 30% of 20 steps
    assert one[0] < 0.1 and one[-1] < 1e-3


def test_plateau_decays_after_more_than_patience_epochs_without_improvement():
    lrs = lr_curve("plateau", epochs=6, steps=1, val_losses=[1.0, 0.9, 0.9, 0.9, 0.9, 0.9], patience=1, gamma=0.5)
    # epochs 2 and 3 do not improve on 0.9: the second bad epoch exceeds patience 1 → halved from epoch 4
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_runs_in_the_training_loop(name):
    exp = _experiment(schedule={"name": name, "milestones": [1]}, train={"epochs": 2})
    result = train(exp, 0, _split(exp), torch.device("cpu"))
    assert result.status == "finished" and len(result.history) == 2


def test_regularization_knobs_run_and_early_stopping_stops():
    exp = _experiment(train={"epochs": 2, "label_smoothing": 0.1, "grad_clip_norm": 1.0},
                      optimizer={"weight_decay": 5e-4})
    assert train(exp, 0, _split(exp), torch.device("cpu")).status == "finished"
    # with a learning rate too small to change any weight, validation loss never improves after epoch 1
    frozen = _experiment(train={"epochs": 10, "early_stopping_patience": 2}, optimizer={"lr": 1e-30, "momentum": 0.0})
    result = train(frozen, 0, _split(frozen), torch.device("cpu"))
    assert result.metrics["stopped_early_epoch"] == 3 and len(result.history) == 3
    assert "test_accuracy" in result.metrics


def test_label_smoothing_changes_the_training_loss_only():
    plain, smooth = _experiment(train={"epochs": 1}), _experiment(train={"epochs": 1, "label_smoothing": 0.2})
    a = train(plain, 0, _split(plain), torch.device("cpu")).history[0]
    b = train(smooth, 0, _split(smooth), torch.device("cpu")).history[0]
    assert a["train_loss"] != b["train_loss"]
    assert Experiment.model_validate(smooth.model_dump()).train.label_smoothing == 0.2
