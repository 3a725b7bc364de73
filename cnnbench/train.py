"""The training loop: one flat function you can read top to bottom.

Speed knobs (``train.precision``, ``channels_last``, ``compile``, ``threads``, ``deterministic``,
``cudnn_benchmark``) apply to this run only: :func:`run_settings` restores torch's global state after.
On XLA the lazy graph is cut once per step (``devices.step_done``) and nothing reads a value back
inside the loop; compile time (XLA or torch.compile) is measured apart from steady-state throughput.

Seeds: ``seed`` fixes the initial weights (same architecture → same weights across variants),
the data order (its own generator, so augmentation does not shift it) and the augmentation
draws (a third generator). Timing covers training steps only, with the device synchronized;
evaluation is untimed. Losses are accumulated on the device and read once per epoch, so no
step waits for the host.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnbench import devices
from cnnbench.augment import BatchAugment
from cnnbench.config import Experiment
from cnnbench.data import Split
from cnnbench.measure import flops_per_sample, matmul_peak_flops
from cnnbench.models import build, count_params
from cnnbench.optim import build_optimizer, build_scheduler
from cnnbench.techniques import compile as compiling
from cnnbench.techniques import precision as amp
from cnnbench.techniques.checkpoint import load_training_state, save_training_state

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


@torch.no_grad()
def evaluate(model, x_all, y_all, idx, scale, shift, batch_size, device, want_preds=False,
             autocast=contextlib.nullcontext, memory_format=torch.contiguous_format):
    """Loss and accuracy of ``model`` on ``x_all[idx]`` (and the predictions, if asked), in the
    precision and memory format it was trained in (``autocast`` makes a fresh context per batch)."""
    with torch.inference_mode(device.type != "xla"):  # XLA tensors do not support inference mode
        return _evaluate(model, x_all, y_all, idx, scale, shift, batch_size, device, want_preds, autocast, memory_format)


def _evaluate(model, x_all, y_all, idx, scale, shift, batch_size, device, want_preds, autocast, memory_format):
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=devices.accumulator_dtype(device))
    correct = torch.zeros((), device=device, dtype=torch.int64)
    preds = []
    for lo, hi in _batches(len(idx), batch_size):
        bi = idx[lo:hi].to(device)
        xb = x_all[bi].float().mul_(scale).sub_(shift).contiguous(memory_format=memory_format)
        yb = y_all[bi]
        with autocast():
            out = model(xb)
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum")
        pred = out.argmax(1)
        correct += (pred == yb).sum()
        if want_preds:
            preds.append(pred)
        devices.step_done(device)
    n = max(len(idx), 1)
    loss, acc = loss_sum.item() / n, correct.item() / n
    return loss, acc, (torch.cat(preds).cpu() if want_preds and preds else None)


def initial_model(exp: Experiment, seed: int, data) -> torch.nn.Module:
    """The model at step 0: seed s gives the same weights to every variant with the same architecture."""
    c, h, _ = data.shape
    torch.manual_seed(seed)
    return build(exp.model, in_channels=c, num_classes=data.num_classes, image_size=h)


def _cpu(obj):
    """A (nested) state dict with its tensors copied to the CPU, for a checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def run_settings(exp: Experiment, device: torch.device):
    """Apply the run's global torch settings (threads, determinism, cuDNN autotuning) and restore
    the previous ones afterwards, so one variant's settings never leak into the next run."""
    t = exp.train
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            if device.type == "cuda":  # cuBLAS needs a fixed workspace to be deterministic
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def check_supported(exp: Experiment, device: torch.device) -> None:
    """Raise ``devices.Unsupported`` (→ the run is skipped with the reason) if ``device`` cannot run ``exp``."""
    amp.check_supported(exp.train.precision, device)
    if exp.train.compile and device.type == "xla":
        raise devices.Unsupported("train.compile on XLA: torch_xla compiles every step's graph already; "
                                  "use compile: false there")


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
    checkpoint: Path | None = None,
) -> RunResult:
    """Train ``exp`` with ``seed`` on ``split``; per-epoch metrics go to ``on_epoch`` as they arrive.

    ``evaluate_test=False`` (search trials) never touches the test set. Compression (issue 6):
    ``model`` starts from these weights instead of the seed's initial ones (fine-tuning);
    ``loss_fn(logits, labels, inputs)`` replaces the cross-entropy (distillation).
    ``checkpoint``: the training state is written there (atomically) after every epoch, and a run that
    finds one continues after its last finished epoch with the same result as an uninterrupted run.
    """
    check_supported(exp, device)
    with run_settings(exp, device):
        return _train(exp, seed, split, device, on_epoch, on_batch, evaluate_test, model, loss_fn, checkpoint)


def _train(exp, seed, split, device, on_epoch, on_batch, evaluate_test, model, loss_fn, checkpoint) -> RunResult:
    # ── setup ────────────────────────────────────────────────────────────────
    data = split.data
    c, h, w = data.shape
    model = model if model is not None else initial_model(exp, seed, data)
    step_flops = flops_per_sample(model, (c, h, w), backward=True)  # counted once, on a CPU copy
    memory_format = torch.channels_last if exp.train.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    devices.manual_seed(device, seed)  # dropout on XLA draws from the device's generator, which the seed must fix
    step_model = compiling.compile_model(model, exp.train.compile_mode) if exp.train.compile else model
    precision = exp.train.precision
    autocast = lambda: amp.autocast(precision, device)  # noqa: E731 - a fresh context per use
    scaler = amp.grad_scaler(precision, device)
    optimizer = build_optimizer(exp.optimizer, model)
    augment = BatchAugment(exp.data.augment, image_size=h)
    order_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)

    mean, std = data.mean_std
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(device)  # x_uint8 * scale - shift == (x/255 - mean)/std
    shift = (mean / std).view(1, c, 1, 1).to(device)
    inv255 = torch.tensor(1.0 / 255.0, device=device)
    train_x, train_y = devices.to_device(data.train_x, device), devices.to_device(data.train_y, device)  # resident
    # XLA: indices are sliced on the host and sent per step, so every step is the same graph (slicing a
    # device tensor would bake each batch's offset into a new graph); elsewhere they live on the device
    idx_device = torch.device("cpu") if device.type == "xla" else device
    train_idx, val_idx = split.train_idx.to(idx_device), split.val_idx.to(idx_device)
    n_train, bs = len(train_idx), exp.data.batch_size
    batches_per_epoch = math.ceil(n_train / bs)
    scheduler, interval = build_scheduler(exp.schedule, optimizer, exp.train.epochs, batches_per_epoch)
    smoothing, clip = exp.train.label_smoothing, exp.train.grad_clip_norm
    patience, best_val_loss, epochs_since_best = exp.train.early_stopping_patience, math.inf, 0

    devices.reset_peak_memory(device)
    result = RunResult(status="finished", model=model)
    train_time = compile_time = 0.0
    target = exp.train.target_accuracy
    time_to_target = epochs_to_target = None
    first_epoch = 1

    def loop_state() -> dict:
        return {"train_time": train_time, "compile_time": compile_time, "time_to_target": time_to_target,
                "epochs_to_target": epochs_to_target, "best_val_loss": best_val_loss,
                "epochs_since_best": epochs_since_best, "history": result.history}

    if checkpoint is not None and checkpoint.exists():  # ── resume after the last finished epoch ──
        state = load_training_state(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        order_gen.set_state(state["rng"]["order"])
        augment_gen.set_state(state["rng"]["augment"])
        torch.set_rng_state(state["rng"]["torch"])
        devices.set_rng_state(device, state["rng"].get("device", state["rng"].get("cuda")))
        loop = state["loop"]
        train_time, compile_time = loop["train_time"], loop["compile_time"]
        time_to_target, epochs_to_target = loop["time_to_target"], loop["epochs_to_target"]
        best_val_loss, epochs_since_best = loop["best_val_loss"], loop["epochs_since_best"]
        first_epoch = state["epoch"] + 1
        result.metrics["resumed_from_epoch"] = state["epoch"]
        for record in loop["history"]:  # the new MLflow run gets the whole curve
            result.history.append(record)
            if on_epoch is not None:
                on_epoch(record)

    for epoch in range(first_epoch, exp.train.epochs + 1):
        # ── train one epoch (timed) ──────────────────────────────────────────
        model.train()
        perm = train_idx[torch.randperm(n_train, generator=order_gen).to(idx_device)]
        loss_sum = torch.zeros((), device=device, dtype=devices.accumulator_dtype(device))
        devices.synchronize(device)
        compiled_before = compiling.compile_seconds() + devices.compile_seconds(device)
        t0 = time.perf_counter()
        for b, (lo, hi) in enumerate(_batches(n_train, bs)):
            bi = perm[lo:hi].to(device)
            xb = train_x[bi].float()
            if augment:
                xb = augment(xb.mul_(inv255), augment_gen).mul_(255.0)
            xb = xb.mul_(scale).sub_(shift).contiguous(memory_format=memory_format)
            yb = train_y[bi]
            with autocast():
                logits = step_model(xb)
                if loss_fn is None:
                    loss = F.cross_entropy(logits, yb, label_smoothing=smoothing)
                else:  # distillation: soft teacher targets + CE
                    loss = loss_fn(logits, yb, xb)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            else:  # fp16: scaled loss; a step with inf/NaN gradients is skipped and the scale lowered
                scaler.scale(loss).backward()
                if clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
            if interval == "batch":
                scheduler.step()
            loss_sum += loss.detach() * (hi - lo)
            devices.step_done(device)  # XLA: one graph per step
            if on_batch is not None:  # progress, and the runner's check for Ctrl-C / SIGTERM
                on_batch(b, batches_per_epoch)
        devices.synchronize(device)
        train_time += time.perf_counter() - t0
        compile_time += compiling.compile_seconds() + devices.compile_seconds(device) - compiled_before
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
        val_loss, val_acc, _ = evaluate(model, train_x, train_y, val_idx, scale, shift, exp.data.eval_batch_size, device,
                                        autocast=autocast, memory_format=memory_format)
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

        # ── early stopping on validation loss ────────────────────────────────
        if val_loss < best_val_loss:
            best_val_loss, epochs_since_best = val_loss, 0
        else:
            epochs_since_best += 1

        # ── checkpoint (before on_epoch, where a pending Ctrl-C / SIGTERM is raised) ──
        if checkpoint is not None and epoch < exp.train.epochs:
            rng = {"order": order_gen.get_state(), "augment": augment_gen.get_state(), "torch": torch.get_rng_state(),
                   "device": devices.rng_state(device)}  # CUDA, XLA, MPS: dropout's generator on the device
            save_training_state(checkpoint, epoch=epoch, model=_cpu(model.state_dict()),
                                optimizer=_cpu(optimizer.state_dict()), scheduler=scheduler.state_dict(),
                                scaler=scaler.state_dict() if scaler is not None else None, rng=rng, loop=loop_state())
        if on_epoch is not None:
            on_epoch(record)
        if patience is not None and epochs_since_best >= patience and epoch < exp.train.epochs:
            result.metrics["stopped_early_epoch"] = epoch
            break

    # ── final measurements ───────────────────────────────────────────────────
    epochs_done = len(result.history) + (result.status == "diverged")
    steady_time = train_time - compile_time  # compilation is reported, not hidden in throughput
    throughput = n_train * epochs_done / steady_time if steady_time > 0 else float("nan")
    result.metrics.update(
        train_time_s=train_time,
        train_throughput=throughput,
        compile_time_s=compile_time,
        train_gflops=throughput * step_flops / 1e9,
        params=count_params(model),
        peak_memory_bytes=devices.peak_memory_bytes(device),
        epochs_completed=len(result.history),
    )
    # model FLOP utilisation against the device's measured matmul peak: in the run's dtype, or fp32's
    # where that is higher (a CPU without bf16/fp16 units computes them in fp32 at best)
    peak = matmul_peak_flops(device, torch.float32)
    if peak and precision != "fp32":
        peak = max(peak, matmul_peak_flops(device, amp.DTYPES[precision]) or 0.0)
    if peak:
        result.metrics["mfu"] = throughput * step_flops / peak
    if time_to_target is not None:
        result.metrics.update(time_to_target_s=time_to_target, epochs_to_target=epochs_to_target)
    if result.status == "diverged" or not evaluate_test:
        return result  # a NaN model has no meaningful test metrics; a search trial must not see them

    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    test_x, test_y = devices.to_device(data.test_x, device), devices.to_device(data.test_y, device)
    all_idx = torch.arange(len(test_y), device=idx_device)
    test_loss, test_acc, preds = evaluate(
        model, test_x, test_y, all_idx, scale, shift, exp.data.eval_batch_size, device, want_preds=True,
        autocast=autocast, memory_format=memory_format,
    )
    y_true = data.test_y.numpy()
    p, r, f1, _ = precision_recall_fscore_support(y_true, preds.numpy(), average="macro", zero_division=0)
    result.metrics.update(test_accuracy=test_acc, test_loss=test_loss, precision_macro=p, recall_macro=r, f1_macro=f1)
    labels = list(range(data.num_classes))
    result.confusion = confusion_matrix(y_true, preds.numpy(), labels=labels).tolist()
    return result
