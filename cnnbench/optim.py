"""Optimizers and learning-rate schedules, keyed by name."""

from __future__ import annotations

import torch

from cnnbench.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@OPTIMIZERS.register
def sgd(params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, **kw):
    """SGD with optional (Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **kw)


@OPTIMIZERS.register
def adam(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, **kw):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam does)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kw)


def build_optimizer(config, params) -> torch.optim.Optimizer:
    """Only the knobs a factory accepts are passed (momentum means nothing to Adam)."""
    import inspect

    fn = OPTIMIZERS.get(config.name)
    accepted = inspect.signature(fn).parameters
    knobs = {k: getattr(config, k) for k in ("momentum", "nesterov", "weight_decay", "betas") if k in accepted}
    return fn(params, lr=config.lr, **knobs, **config.kwargs)


# Schedules return a torch.optim.lr_scheduler object stepped once per epoch.


@SCHEDULES.register
def constant(optimizer, epochs: int, config):
    """The base learning rate throughout."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


@SCHEDULES.register
def step(optimizer, epochs: int, config):
    """Multiply the LR by ``gamma`` every ``step_size`` epochs (StepLR)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)


@SCHEDULES.register
def cosine(optimizer, epochs: int, config):
    """Cosine decay from the base LR to ``min_lr`` over the run (CosineAnnealingLR, per epoch)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=config.min_lr)


def build_scheduler(config, optimizer: torch.optim.Optimizer, epochs: int):
    return SCHEDULES.get(config.name)(optimizer, epochs, config)
