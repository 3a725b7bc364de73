"""The training loop: the epoch and batch loop reads top to bottom in one screen (:func:`_loop`); setup,
resume, checkpoints and the final measurements sit beside it.

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

from cnnbench import devices, techniques
from cnnbench.augment import BatchAugment
from cnnbench.checkpoints import TrainingCheckpoint, load_training_state, save_training_state
from cnnbench.config import Experiment
from cnnbench.data import Split
from cnnbench.evaluation import batches, evaluate, index_device, normalizer, test_metrics
from cnnbench.layers import set_training_progress
from cnnbench.measure import flops_per_sample, matmul_peak_flops
from cnnbench.models import build, count_params
from cnnbench.optim import build_optimizer, build_scheduler
from cnnbench.techniques import compile as compiling
from cnnbench.techniques import precision as amp

AUGMENT_SEED_OFFSET = 1_000_003
# FLOPs of one training step per (model config, input shape, classes): the probe (a forward and backward
# under FlopCounterMode) cost the quickstart ~2 s of 32 runs under cProfile; its answer never changes
_STEP_FLOPS: dict[tuple, float] = {}


@dataclass
class RunResult:
    status: str  # finished | diverged
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    metrics: dict[str, float] = field(default_factory=dict)  # final metrics
    confusion: list[list[int]] | None = None
    message: str = ""
    model: torch.nn.Module | None = None  # what is deployed (compression, inference metrics, checkpoints)
    artifacts: dict = field(default_factory=dict)  # extra files for the run (e.g. sparsity.json)
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags (e.g. how a model was compressed)
    float_model: torch.nn.Module | None = None  # the float model behind a quantized ``model`` (FLOPs, params)
    quantized: bool = False  # ``model`` runs int8 kernels on the CPU


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
    for technique in techniques.active(exp):
        technique.check_device(exp, device)
    if exp.train.processes > 1 and device.type not in ("cpu", "cuda"):
        raise devices.Unsupported(f"train.processes > 1 runs on the CPU (gloo) or CUDA (nccl), not on {device.type}")
    if exp.train.processes > 1 and device.type == "cuda" and torch.cuda.device_count() < exp.train.processes:
        raise devices.Unsupported(f"train.processes: {exp.train.processes} needs as many GPUs; this machine has "
                                  f"{torch.cuda.device_count()}")


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
    checkpoint: TrainingCheckpoint | Path | None = None,
    on_check: Callable[[float, dict[str, float]], None] | None = None,
    checks_per_epoch: int = 1,
    rank_world: tuple[int, int] = (0, 1),
) -> RunResult:
    """Train ``exp`` with ``seed`` on ``split``; per-epoch metrics go to ``on_epoch`` as they arrive.

    ``checks_per_epoch`` > 1 (searches: a pruner can stop a hopeless trial inside its first epoch) also
    validates ``checks_per_epoch − 1`` times within each epoch, at even fractions of its batches, on at
    most ``CHECK_IMAGES`` of the validation images (evenly spaced: a full pass 4× an epoch cost more than
    pruning saved), and passes (epochs so far, e.g. 1.25; {val_loss, val_accuracy}) to ``on_check`` —
    untimed, and without changing the training itself (evaluation draws no random numbers and leaves
    BatchNorm's statistics).

    ``evaluate_test=False`` (search trials) never touches the test set. ``model`` starts from these
    weights instead of the seed's initial ones (fine-tuning); ``loss_fn(logits, labels, inputs)``
    replaces the cross-entropy (distillation). ``checkpoint``: the training state is written there
    (atomically) after an epoch, at most every ``checkpoint.every_s`` seconds, and a run that finds one
    continues after its last saved epoch with the same result as an uninterrupted run. ``rank_world``: this process's rank and the number of
    processes in a data-parallel run (``cnnbench.distributed`` starts them, with the process group up):
    each takes its share of every batch and DDP averages the gradients.
    """
    if isinstance(checkpoint, Path):
        checkpoint = TrainingCheckpoint(checkpoint)
    check_supported(exp, device)
    with run_settings(exp, device):
        run = _setup(exp, seed, split, device, model, loss_fn, rank_world)
        if checkpoint is not None and checkpoint.path.exists():
            _resume(run, checkpoint, on_epoch)
        run.on_check, run.checks_per_epoch = on_check, checks_per_epoch if on_check is not None else 1
        _loop(run, on_epoch, on_batch, checkpoint)
        _final_metrics(run)
        if run.result.status == "finished" and evaluate_test:  # a search trial must not see the test set
            metrics, run.result.confusion = test_metrics(run.model, split.data, exp.data.eval_batch_size, device,
                                                         run.autocast, run.memory_format)
            run.result.metrics.update(metrics)
        return run.result


@dataclass
class _Run:
    """Everything one training run holds: what it trains, with what, and its counters so far."""

    exp: Experiment
    split: Split
    device: torch.device
    model: torch.nn.Module
    step_model: torch.nn.Module  # what the training step calls (compiled, or the model itself)
    loss_fn: Callable | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    interval: str  # when the scheduler steps: batch | epoch | plateau
    scaler: torch.amp.GradScaler | None
    augment: BatchAugment
    order_gen: torch.Generator
    augment_gen: torch.Generator
    memory_format: torch.memory_format
    scale: torch.Tensor
    shift: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    step_flops: float
    result: RunResult
    first_epoch: int = 1
    train_time: float = 0.0
    compile_time: float = 0.0
    time_to_target: float | None = None
    epochs_to_target: int | None = None
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    on_check: Callable | None = None  # mid-epoch validations (see train's checks_per_epoch)
    checks_per_epoch: int = 1
    check_time: float = 0.0  # seconds of mid-epoch validation, taken out of the training time
    rank: int = 0  # data-parallel training: this process's share of every batch, of ``world``
    saved_at: float = field(default_factory=time.perf_counter)  # when the run started or last checkpointed
    world: int = 1

    def autocast(self):
        """A fresh autocast context of the run's precision (a no-op for fp32)."""
        return amp.autocast(self.exp.train.precision, self.device)

    def loop_state(self) -> dict:
        return {"train_time": self.train_time, "compile_time": self.compile_time, "time_to_target": self.time_to_target,
                "epochs_to_target": self.epochs_to_target, "best_val_loss": self.best_val_loss,
                "epochs_since_best": self.epochs_since_best, "history": self.result.history}


def _setup(exp: Experiment, seed: int, split: Split, device: torch.device, model, loss_fn,
           rank_world: tuple[int, int] = (0, 1)) -> _Run:
    data = split.data
    c, h, w = data.shape
    if model is None:  # built from the config: every seed and variant of one architecture counts the same
        model = initial_model(exp, seed, data)
        key = (exp.model.model_dump_json(), tuple(data.shape), data.num_classes)
        step_flops = _STEP_FLOPS.get(key)
        if step_flops is None:
            step_flops = _STEP_FLOPS[key] = flops_per_sample(model, (c, h, w), backward=True)
    else:  # given weights (fine-tuning a pruned or factorized model): its own structure
        step_flops = flops_per_sample(model, (c, h, w), backward=True)
    memory_format = torch.channels_last if exp.train.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    devices.manual_seed(device, seed)  # dropout on XLA draws from the device's generator, which the seed must fix
    step_model = model
    for technique in techniques.active(exp, "training"):
        step_model = technique.step_model(exp, step_model)
    rank, world = rank_world
    if world > 1:  # every process starts from the same weights (the seed's); DDP averages the gradients
        step_model = torch.nn.parallel.DistributedDataParallel(step_model)
    optimizer = build_optimizer(exp.optimizer, model)
    scale, shift = normalizer(data, device)
    idx_device = index_device(device)
    train_idx = split.train_idx.to(idx_device)
    scheduler, interval = build_scheduler(exp.schedule, optimizer, exp.train.epochs,
                                          math.ceil(len(train_idx) / exp.data.batch_size))
    devices.reset_peak_memory(device)
    return _Run(
        exp=exp, split=split, device=device, model=model, step_model=step_model, loss_fn=loss_fn, optimizer=optimizer,
        scheduler=scheduler, interval=interval, scaler=amp.grad_scaler(exp.train.precision, device),
        augment=BatchAugment(exp.data.augment, image_size=h), order_gen=torch.Generator().manual_seed(seed),
        augment_gen=torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET), memory_format=memory_format,
        scale=scale, shift=shift, train_x=devices.to_device(data.train_x, device),  # resident on the device
        train_y=devices.to_device(data.train_y, device), train_idx=train_idx, val_idx=split.val_idx.to(idx_device),
        step_flops=step_flops, result=RunResult(status="finished", model=model), rank=rank, world=world)


def _resume(run: _Run, checkpoint: TrainingCheckpoint, on_epoch) -> None:
    """Continue after the last finished epoch of ``checkpoint``: weights, optimizer, scheduler, scaler,
    every RNG and the loop's counters, so the run ends as an uninterrupted one would."""
    state = load_training_state(checkpoint.path, owner=checkpoint.owner)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.order_gen.set_state(state["rng"]["order"])
    run.augment_gen.set_state(state["rng"]["augment"])
    torch.set_rng_state(state["rng"]["torch"])
    devices.set_rng_state(run.device, state["rng"].get("device", state["rng"].get("cuda")))
    loop = state["loop"]
    run.train_time, run.compile_time = loop["train_time"], loop["compile_time"]
    run.time_to_target, run.epochs_to_target = loop["time_to_target"], loop["epochs_to_target"]
    run.best_val_loss, run.epochs_since_best = loop["best_val_loss"], loop["epochs_since_best"]
    run.first_epoch = state["epoch"] + 1
    run.result.metrics["resumed_from_epoch"] = state["epoch"]
    for record in loop["history"]:  # the new MLflow run gets the whole curve
        run.result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)


def _save(run: _Run, checkpoint: TrainingCheckpoint, epoch: int) -> None:
    rng = {"order": run.order_gen.get_state(), "augment": run.augment_gen.get_state(), "torch": torch.get_rng_state(),
           "device": devices.rng_state(run.device)}  # CUDA, XLA, MPS: dropout's generator on the device
    save_training_state(checkpoint.path, checkpoint.owner, epoch=epoch, model=_cpu(run.model.state_dict()),
                        optimizer=_cpu(run.optimizer.state_dict()), scheduler=run.scheduler.state_dict(),
                        scaler=run.scaler.state_dict() if run.scaler is not None else None, rng=rng,
                        loop=run.loop_state())
    if checkpoint.on_saved is not None:
        checkpoint.on_saved(checkpoint.path, epoch)


def _loop(run: _Run, on_epoch, on_batch, checkpoint: TrainingCheckpoint | None) -> None:
    exp, result, device = run.exp, run.result, run.device
    target, patience = exp.train.target_accuracy, exp.train.early_stopping_patience
    for epoch in range(run.first_epoch, exp.train.epochs + 1):
        # scheduled regularizers (DropBlock's rate) grow linearly: 0 in the first epoch, full in the last
        set_training_progress(run.model, (epoch - 1) / max(exp.train.epochs - 1, 1))
        # ── train one epoch (timed, the device synchronized) ─────────────────
        devices.synchronize(device)
        compiled_before = compiling.compile_seconds() + devices.compile_seconds(device)
        t0, run.check_time = time.perf_counter(), 0.0
        train_loss = _train_epoch(run, on_batch, epoch)
        if run.world > 1:  # each process summed the loss over its share of the images
            torch.distributed.all_reduce(train_loss)
        devices.synchronize(device)
        run.train_time += time.perf_counter() - t0 - run.check_time
        run.compile_time += compiling.compile_seconds() + devices.compile_seconds(device) - compiled_before
        lr = run.optimizer.param_groups[0]["lr"]  # the last learning rate used in this epoch
        if run.interval == "epoch":
            run.scheduler.step()
        train_loss = train_loss.item() / len(run.train_idx)
        if not math.isfinite(train_loss):
            result.status, result.message = "diverged", f"diverged at epoch {epoch}: training loss {train_loss}"
            result.metrics["diverged_epoch"] = epoch
            return
        # ── validate (untimed) ───────────────────────────────────────────────
        val_loss, val_acc, _ = evaluate(run.model, run.train_x, run.train_y, run.val_idx, run.scale, run.shift,
                                        exp.data.eval_batch_size, device, autocast=run.autocast,
                                        memory_format=run.memory_format)
        if run.interval == "plateau":
            run.scheduler.step(val_loss)
        if target is not None and run.time_to_target is None and val_acc >= target:
            run.time_to_target, run.epochs_to_target = run.train_time, epoch
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr,
                  "train_time_cum_s": run.train_time}
        result.history.append(record)
        # ── early stopping on validation loss; checkpoint before on_epoch (which raises a pending Ctrl-C) ──
        if val_loss < run.best_val_loss:
            run.best_val_loss, run.epochs_since_best = val_loss, 0
        else:
            run.epochs_since_best += 1
        if checkpoint is not None and epoch < exp.train.epochs and time.perf_counter() - run.saved_at >= checkpoint.every_s:
            _save(run, checkpoint, epoch)
            run.saved_at = time.perf_counter()
        if on_epoch is not None:
            on_epoch(record)
        if patience is not None and run.epochs_since_best >= patience and epoch < exp.train.epochs:
            result.metrics["stopped_early_epoch"] = epoch
            return


def _train_epoch(run: _Run, on_batch, epoch: int) -> torch.Tensor:
    """One pass over the training split; returns the summed loss, still on the device (read once per epoch)."""
    exp, device, optimizer, scaler = run.exp, run.device, run.optimizer, run.scaler
    smoothing, clip, bs = exp.train.label_smoothing, exp.train.grad_clip_norm, exp.data.batch_size
    n_train, idx_device = len(run.train_idx), run.train_idx.device
    run.model.train()
    perm = run.train_idx[torch.randperm(n_train, generator=run.order_gen).to(idx_device)]
    loss_sum = torch.zeros((), device=device, dtype=devices.accumulator_dtype(device))
    n_batches = math.ceil(n_train / bs)
    inv255 = torch.tensor(1.0 / 255.0, device=device)
    k = run.checks_per_epoch
    checks = {math.ceil(j * n_batches / k) - 1: j / k for j in range(1, k)}  # batch index → fraction of the epoch
    for b, (lo, hi) in enumerate(batches(n_train, bs)):
        bi = perm[lo:hi].to(device)
        xb = run.train_x[bi].float()
        if run.augment:
            xb = run.augment(xb.mul_(inv255), run.augment_gen).mul_(255.0)
        xb = xb.mul_(run.scale).sub_(run.shift).contiguous(memory_format=run.memory_format)
        yb = run.train_y[bi]
        if run.world > 1:  # the batch (augmented whole, as one process would) split between the processes
            xb, yb = xb.tensor_split(run.world)[run.rank], yb.tensor_split(run.world)[run.rank]
        with run.autocast():
            logits = run.step_model(xb)
            loss = (F.cross_entropy(logits, yb, label_smoothing=smoothing) if run.loss_fn is None
                    else run.loss_fn(logits, yb, xb))  # distillation: soft teacher targets + CE
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
            optimizer.step()
        else:  # fp16: scaled loss; a step with inf/NaN gradients is skipped and the scale lowered
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        if run.interval == "batch":
            run.scheduler.step()
        loss_sum += loss.detach() * len(yb)
        devices.step_done(device)  # XLA: one graph per step
        if on_batch is not None:  # progress, and the runner's check for Ctrl-C / SIGTERM
            on_batch(b, n_batches)
        if b in checks:
            _check(run, epoch - 1 + checks[b])
    return loss_sum


CHECK_IMAGES = 2000  # mid-epoch validations: the accuracy of a 90% model on 2,000 images has an SE of 0.7 pp


def _check(run: _Run, epochs: float) -> None:
    """A mid-epoch validation for ``on_check`` (which may raise, e.g. to prune), kept out of the timing."""
    devices.synchronize(run.device)
    t0 = time.perf_counter()
    n = len(run.val_idx)
    idx = run.val_idx if n <= CHECK_IMAGES else run.val_idx[torch.linspace(0, n - 1, CHECK_IMAGES).long()]
    val_loss, val_acc, _ = evaluate(run.model, run.train_x, run.train_y, idx, run.scale, run.shift,
                                    run.exp.data.eval_batch_size, run.device, autocast=run.autocast,
                                    memory_format=run.memory_format)
    run.model.train()
    run.check_time += time.perf_counter() - t0
    run.on_check(epochs, {"val_loss": val_loss, "val_accuracy": val_acc})


def _final_metrics(run: _Run) -> None:
    """Training time, steady-state throughput (compilation excluded), FLOP rate and utilisation, memory."""
    result, precision = run.result, run.exp.train.precision
    epochs_done = len(result.history) + (result.status == "diverged")
    steady_time = run.train_time - run.compile_time  # compilation is reported, not hidden in throughput
    throughput = len(run.train_idx) * epochs_done / steady_time if steady_time > 0 else float("nan")
    result.metrics.update(
        train_time_s=run.train_time,
        train_throughput=throughput,
        compile_time_s=run.compile_time,
        train_gflops=throughput * run.step_flops / 1e9,
        params=count_params(run.model),
        peak_memory_bytes=devices.peak_memory_bytes(run.device),
        epochs_completed=len(result.history),
    )
    # model FLOP utilisation against the device's measured matmul peak: in the run's dtype, or fp32's
    # where that is higher (a CPU without bf16/fp16 units computes them in fp32 at best)
    peak = matmul_peak_flops(run.device, torch.float32)
    if peak and precision != "fp32":
        peak = max(peak, matmul_peak_flops(run.device, amp.dtype(precision)) or 0.0)
    if peak:
        result.metrics["mfu"] = throughput * run.step_flops / peak
    if run.time_to_target is not None:
        result.metrics.update(time_to_target_s=run.time_to_target, epochs_to_target=run.epochs_to_target)
