"""The training loop: one flat function you can read top to bottom.

Seeds: ``seed`` fixes the initial weights (same architecture → same weights across variants),
the data order (its own generator, so augmentation does not shift it) and the augmentation
draws (a third generator). Timing covers training steps only, with the device synchronized;
evaluation is untimed. Losses are accumulated on the device and read once per epoch, so no
step waits for the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cnnbench import devices
from cnnbench.augment import BatchAugment
from cnnbench.config import Experiment
from cnnbench.data import Split
from cnnbench.models import build, count_params
from cnnbench.optim import build_optimizer, build_scheduler

AUGMENT_SEED_OFFSET = 1_000_003


@dataclass
class RunResult:
    status: str  # finished | diverged
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    metrics: dict[str, float] = field(default_factory=dict)  # final metrics
    confusion: list[list[int]] | None = None
    message: str = ""
    model: torch.nn.Module | None = None  # the trained model (compression, inference metrics, checkpoints)
    artifacts: dict = field(default_factory=dict)  # extra files for the run (e.g. sparsity.json)
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags (e.g. how a model was compressed)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


@torch.inference_mode()
def evaluate(model, x_all, y_all, idx, scale, shift, batch_size, device, want_preds=False):
    """Loss and accuracy of ``model`` on ``x_all[idx]`` (and the predictions, if asked)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    preds = []
    for lo, hi in _batches(len(idx), batch_size):
        bi = idx[lo:hi]
        xb = x_all[bi].float().mul_(scale).sub_(shift)
        yb = y_all[bi]
        out = model(xb)
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum")
        pred = out.argmax(1)
        correct += (pred == yb).sum()
        if want_preds:
            preds.append(pred)
    n = max(len(idx), 1)
    loss, acc = loss_sum.item() / n, correct.item() / n
    return loss, acc, (torch.cat(preds).cpu() if want_preds and preds else None)


def initial_model(exp: Experiment, seed: int, data) -> torch.nn.Module:
    """The model at step 0: seed s gives the same weights to every variant with the same architecture."""
    c, h, _ = data.shape
    torch.manual_seed(seed)
    return build(exp.model, in_channels=c, num_classes=data.num_classes, image_size=h)


def train(
    exp: Experiment,
    seed: int,
    split: Split,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    evaluate_test: bool = True,
    model: torch.nn.Module | None = None,
    loss_fn: Callable | None = None,
) -> RunResult:
    """Train ``exp`` with ``seed`` on ``split``; per-epoch metrics go to ``on_epoch`` as they arrive.

    ``evaluate_test=False`` (search trials) never touches the test set. Compression (issue 6):
    ``model`` starts from these weights instead of the seed's initial ones (fine-tuning);
    ``loss_fn(logits, labels, inputs)`` replaces the cross-entropy (distillation).
    """
    # ── setup ────────────────────────────────────────────────────────────────
    if exp.train.threads:
        torch.set_num_threads(exp.train.threads)
    data = split.data
    c, h, w = data.shape
    model = (model if model is not None else initial_model(exp, seed, data)).to(device)
    optimizer = build_optimizer(exp.optimizer, model)
    augment = BatchAugment(exp.data.augment, image_size=h)
    order_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)

    mean, std = data.mean_std
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(device)  # x_uint8 * scale - shift == (x/255 - mean)/std
    shift = (mean / std).view(1, c, 1, 1).to(device)
    inv255 = torch.tensor(1.0 / 255.0, device=device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)  # whole set resident on the device
    train_idx, val_idx = split.train_idx.to(device), split.val_idx.to(device)
    n_train, bs = len(train_idx), exp.data.batch_size
    batches_per_epoch = math.ceil(n_train / bs)
    scheduler, interval = build_scheduler(exp.schedule, optimizer, exp.train.epochs, batches_per_epoch)
    smoothing, clip = exp.train.label_smoothing, exp.train.grad_clip_norm
    patience, best_val_loss, epochs_since_best = exp.train.early_stopping_patience, math.inf, 0

    devices.reset_peak_memory(device)
    result = RunResult(status="finished", model=model)
    train_time = 0.0
    target = exp.train.target_accuracy
    time_to_target = epochs_to_target = None

    for epoch in range(1, exp.train.epochs + 1):
        # ── train one epoch (timed) ──────────────────────────────────────────
        model.train()
        perm = train_idx[torch.randperm(n_train, generator=order_gen).to(device)]
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        devices.synchronize(device)
        t0 = time.perf_counter()
        for b, (lo, hi) in enumerate(_batches(n_train, bs)):
            bi = perm[lo:hi]
            xb = train_x[bi].float()
            if augment:
                xb = augment(xb.mul_(inv255), augment_gen).mul_(255.0)
            xb = xb.mul_(scale).sub_(shift)
            yb = train_y[bi]
            if loss_fn is None:
                loss = F.cross_entropy(model(xb), yb, label_smoothing=smoothing)
            else:  # issue 6: distillation
                loss = loss_fn(model(xb), yb, xb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if interval == "batch":
                scheduler.step()
            loss_sum += loss.detach() * (hi - lo)
            if on_batch is not None:  # progress, and the runner's check for Ctrl-C / SIGTERM
                on_batch(b, batches_per_epoch)
        devices.synchronize(device)
        train_time += time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]  # the last learning rate used in this epoch
        if interval == "epoch":
            scheduler.step()

        # ── check for divergence ─────────────────────────────────────────────
        train_loss = loss_sum.item() / n_train
        if not math.isfinite(train_loss):
            result.status = "diverged"
            result.message = f"diverged at epoch {epoch}: training loss {train_loss}"
            result.metrics["diverged_epoch"] = epoch
            break

        # ── validate (untimed) ───────────────────────────────────────────────
        val_loss, val_acc, _ = evaluate(model, train_x, train_y, val_idx, scale, shift, exp.data.eval_batch_size, device)
        if interval == "plateau":
            scheduler.step(val_loss)
        if target is not None and time_to_target is None and val_acc >= target:
            time_to_target, epochs_to_target = train_time, epoch
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": lr,
            "train_time_cum_s": train_time,
        }
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)

        # ── early stopping on validation loss ────────────────────────────────
        if val_loss < best_val_loss:
            best_val_loss, epochs_since_best = val_loss, 0
        else:
            epochs_since_best += 1
        if patience is not None and epochs_since_best >= patience and epoch < exp.train.epochs:
            result.metrics["stopped_early_epoch"] = epoch
            break

    # ── final measurements ───────────────────────────────────────────────────
    epochs_done = len(result.history) + (result.status == "diverged")
    result.metrics.update(
        train_time_s=train_time,
        train_throughput=n_train * epochs_done / train_time if train_time > 0 else float("nan"),
        params=count_params(model),
        peak_memory_bytes=devices.peak_memory_bytes(device),
        epochs_completed=len(result.history),
    )
    if time_to_target is not None:
        result.metrics.update(time_to_target_s=time_to_target, epochs_to_target=epochs_to_target)
    if result.status == "diverged" or not evaluate_test:
        return result  # a NaN model has no meaningful test metrics; a search trial must not see them

    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    all_idx = torch.arange(len(test_y), device=device)
    test_loss, test_acc, preds = evaluate(
        model, test_x, test_y, all_idx, scale, shift, exp.data.eval_batch_size, device, want_preds=True
    )
    y_true = data.test_y.numpy()
    p, r, f1, _ = precision_recall_fscore_support(y_true, preds.numpy(), average="macro", zero_division=0)
    result.metrics.update(test_accuracy=test_acc, test_loss=test_loss, precision_macro=p, recall_macro=r, f1_macro=f1)
    labels = list(range(data.num_classes))
    result.confusion = confusion_matrix(y_true, preds.numpy(), labels=labels).tolist()
    return result
