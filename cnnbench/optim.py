"""Optimizers and learning-rate schedules, keyed by name.

Weight decay is applied to conv/linear weights only — not to biases and norm parameters — unless
``optimizer.decay_norm_and_bias`` is set (as timm and nanoGPT do: decaying a norm's scale fights the
normalization). Schedules say whether they step per epoch, per batch or on the validation loss.
"""

from __future__ import annotations

import inspect

import torch

from cnnbench.registry import Registry


def _torch_optimizer(name: str):
    """Any ``torch.optim`` optimizer class by its name in any case (``NAdam``, ``radam``, …), called with its kwargs."""
    classes = {n.lower(): c for n, c in vars(torch.optim).items()
               if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}
    cls = classes.get(name.lower())
    return None if cls is None else (lambda params, lr, **kw: cls(params, lr=lr, **kw))


OPTIMIZERS = Registry("optimizer", fallback=_torch_optimizer, any_case=True,
                      fallback_hint="(or any torch.optim class by name, in any case, e.g. NAdam, with optimizer.kwargs)")
SCHEDULES = Registry("schedule", any_case=True)  # torch.optim.lr_scheduler class names are aliases


@OPTIMIZERS.register
def sgd(params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, **kw):
    """SGD with optional (Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **kw)


@OPTIMIZERS.register
def adam(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, **kw):
    """Adam (L2 weight decay added to the gradient, as torch.optim.Adam does)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kw)


@OPTIMIZERS.register
def adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, **kw):
    """AdamW: Adam with decoupled weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kw)


@OPTIMIZERS.register
def rmsprop(params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, **kw):
    """RMSprop (alpha 0.99), with optional momentum."""
    return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)


@OPTIMIZERS.register
def adagrad(params, lr: float, weight_decay: float = 0.0, **kw):
    """Adagrad."""
    return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay, **kw)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups: conv/linear weights (decayed) and biases + norm parameters (not, unless asked)."""
    if decay_norm_and_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Only the knobs a factory accepts are passed (momentum means nothing to Adam)."""
    fn = OPTIMIZERS.get(config.name)
    accepted = inspect.signature(fn).parameters
    knobs = {k: getattr(config, k) for k in ("momentum", "nesterov", "betas") if k in accepted}
    groups = param_groups(model, config.weight_decay, config.decay_norm_and_bias)
    return fn(groups, lr=config.lr, **knobs, **config.kwargs)


# Schedules return a torch.optim.lr_scheduler object; registry info says when it is stepped:
# "epoch" (after each epoch), "batch" (after each optimizer step) or "plateau" (each epoch, on val loss).


@SCHEDULES.register(interval="epoch")
def constant(optimizer, config, epochs: int, steps_per_epoch: int):
    """The base learning rate throughout."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


@SCHEDULES.register(interval="epoch", aliases=("StepLR",))
def step(optimizer, config, epochs: int, steps_per_epoch: int):
    """Multiply the LR by ``gamma`` every ``step_size`` epochs (StepLR)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)


@SCHEDULES.register(interval="epoch", aliases=("MultiStepLR",))
def multistep(optimizer, config, epochs: int, steps_per_epoch: int):
    """Multiply the LR by ``gamma`` at each epoch in ``milestones`` (MultiStepLR)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.milestones), gamma=config.gamma)


@SCHEDULES.register(interval="epoch", aliases=("ExponentialLR",))
def exponential(optimizer, config, epochs: int, steps_per_epoch: int):
    """Multiply the LR by ``gamma`` every epoch (ExponentialLR)."""
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)


@SCHEDULES.register(interval="epoch", aliases=("CosineAnnealingLR",))
def cosine(optimizer, config, epochs: int, steps_per_epoch: int):
    """Cosine decay from the base LR to ``min_lr`` over the run (CosineAnnealingLR, per epoch)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=config.min_lr)


@SCHEDULES.register(interval="batch")
def warmup_cosine(optimizer, config, epochs: int, steps_per_epoch: int):
    """Linear warm-up over ``warmup_epochs`` (step i of w uses lr·(i+1)/w), then cosine to ``min_lr``; per batch."""
    total = max(epochs * steps_per_epoch, 2)
    warm = min(max(round(config.warmup_epochs * steps_per_epoch), 1), total - 1)
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warm, total_iters=max(warm - 1, 1)),
         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warm, eta_min=config.min_lr)],
        milestones=[warm],
    )


@SCHEDULES.register(interval="batch", aliases=("OneCycleLR",))
def onecycle(optimizer, config, epochs: int, steps_per_epoch: int):
    """One-cycle: up to the base LR (as max_lr) over ``pct_start`` of the run, then down; per batch."""
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                               steps_per_epoch=steps_per_epoch, pct_start=config.pct_start)


@SCHEDULES.register(interval="plateau", aliases=("ReduceLROnPlateau",))
def plateau(optimizer, config, epochs: int, steps_per_epoch: int):
    """Multiply the LR by ``gamma`` once validation loss has failed to improve for more than ``patience`` epochs."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.gamma,
                                                      patience=config.patience, min_lr=config.min_lr)


def build_scheduler(config, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    """(scheduler, interval) with interval in {"epoch", "batch", "plateau"}."""
    fn = SCHEDULES.get(config.name)
    return fn(optimizer, config, epochs, steps_per_epoch), SCHEDULES.info(config.name)["interval"]
