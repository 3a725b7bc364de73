"""The runner's hook for compression (issue 6): where a variant's trained weights come from, how a
quantize/prune/distill variant runs, and the inference figures measured for every run.

* A quantize/prune variant starts from its source's trained weights for the same seed — a variant of
  the suite (``start_from``, default the baseline), trained once and reused by every variant that
  names it — or from a checkpoint file / ``runs:/<id>/<path>`` artifact. A distill variant trains from
  scratch against a teacher found the same way. Variants that others need store their weights as the
  MLflow artifact ``checkpoint/model.pt`` (and in a local cache for the suite's invocation), so a
  later ``cnnbench run`` that reuses the source still finds them.
* Order: within each seed, sources and teachers run before the variants that need them.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cnnbench.config import Experiment, RunSpec, Suite, upstream_variants
from cnnbench.techniques.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"


# ───────────────────────────── where weights come from ─────────────────────────────


class Upstream:
    """Trained weights of sources and teachers, per seed: saved when their run finishes, found again
    in this invocation's cache or in MLflow for runs reused from an earlier invocation."""

    def __init__(self, suite: Suite, tracker, experiment_id: str):
        self.suite, self.tracker, self.experiment_id = suite, tracker, experiment_id
        self.needed = {u for v in suite.experiments for u in upstream_variants(suite, v)}
        self.cache_dir = Path(tempfile.mkdtemp(prefix=f"cnnbench-{suite.name}-checkpoints-"))
        self.local: dict[tuple[str, int], Path] = {}
        self.failed: dict[tuple[str, int], str] = {}

    def order(self, specs: list[RunSpec], todo: list[RunSpec], done: dict[str, str]) -> list[RunSpec]:
        """``todo`` plus any reused source whose run stored no checkpoint (it is trained again), sorted so
        that within a seed every source/teacher runs before the variants that need it."""
        todo = list(todo)
        planned = {(s.variant, s.seed) for s in todo}
        by_key = {(s.variant, s.seed): s for s in specs}
        for spec in list(todo):
            for up in upstream_variants(self.suite, spec.variant):
                src = by_key.get((up, spec.seed))
                if src is None or (up, spec.seed) in planned:
                    continue
                run_id = done.get(src.fingerprint)
                if run_id is None or not self.tracker.has_artifact(run_id, CHECKPOINT_ARTIFACT):
                    todo.append(src)
                    planned.add((up, spec.seed))
        seeds = self.suite.seed_list()
        return sorted(todo, key=lambda s: (seeds.index(s.seed) if s.seed in seeds else 0, self.depth(s.variant)))

    def depth(self, variant: str) -> int:
        ups = upstream_variants(self.suite, variant)
        return 1 + max(self.depth(u) for u in ups) if ups else 0

    def save(self, variant: str, seed: int, run_id: str, model: nn.Module) -> None:
        """Keep a needed variant's trained weights: local cache (atomic write) and MLflow artifact."""
        if variant not in self.needed:
            return
        path = save_checkpoint(model.state_dict(), self.cache_dir / f"{variant}-seed{seed}.pt")
        self.local[(variant, seed)] = path
        self.tracker.log_artifacts(run_id, {CHECKPOINT_ARTIFACT: path.read_bytes()})

    def state(self, ref: str, seed: int) -> dict[str, torch.Tensor]:
        """The state dict ``ref`` (a variant, for ``seed``; a file; or ``runs:/…``) names. Raises
        :class:`Missing` when a source variant has no finished run for the seed."""
        if ref in self.suite.experiments:
            path = self.local.get((ref, seed))
            if path is None:
                spec_fp = self.suite.experiments[ref].fingerprint(seed)
                run_id = self.tracker.done_runs(self.experiment_id, self.suite.name).get(spec_fp)
                if run_id is None or not self.tracker.has_artifact(run_id, CHECKPOINT_ARTIFACT):
                    raise Missing(f"'{ref}' has no finished run with a checkpoint for seed {seed}")
                path = Path(self.tracker.download_artifact(run_id, CHECKPOINT_ARTIFACT, str(self.cache_dir / f"{ref}-{seed}")))
                self.local[(ref, seed)] = path
            return load_checkpoint(path)
        if ref.startswith(("runs:/", "models:/")):
            return load_checkpoint(self.tracker.download_uri(ref, str(self.cache_dir / "uri")))
        return load_checkpoint(ref)


class Missing(RuntimeError):
    """A source or teacher run did not finish: the dependent run is skipped with this reason."""


# ───────────────────────────── running a compression variant ─────────────────────────────


def _normalizer(split, device):
    data = split.data
    c = data.shape[0]
    mean, std = data.mean_std
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1).to(device)
    shift = (mean / std).view(1, c, 1, 1).to(device)
    return scale, shift


def _calibration_batches(split, batch_size: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` normalized training batches (never validation or test), drawn with the run's seed."""
    scale, shift = _normalizer(split, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    idx = split.train_idx[torch.randperm(len(split.train_idx), generator=gen)]
    x = split.data.train_x
    return [x[idx[i:i + batch_size]].float().mul_(scale).sub_(shift)
            for i in range(0, min(len(idx), n * batch_size), batch_size)]


class _Phases:
    """Several fine-tuning calls of ``train`` reported as one run: epochs and training time continue."""

    def __init__(self, exp: Experiment, seed: int, split, on_epoch, on_batch):
        self.exp, self.seed, self.split, self.on_epoch, self.on_batch = exp, seed, split, on_epoch, on_batch
        self.history: list[dict] = []
        self.train_time = 0.0
        self.images = 0
        self.diverged: str | None = None

    def finetune(self, model: nn.Module, epochs: int, device: torch.device, loss_fn=None) -> None:
        from cnnbench.train import train

        if epochs <= 0 or self.diverged:
            return
        exp = self.exp.model_copy(update={"train": self.exp.train.model_copy(
            update={"epochs": epochs, "early_stopping_patience": None, "target_accuracy": None})})
        offset, t_offset = len(self.history), self.train_time

        def on_epoch(record: dict) -> None:
            record = dict(record, epoch=record["epoch"] + offset, train_time_cum_s=record["train_time_cum_s"] + t_offset)
            self.history.append(record)
            if self.on_epoch is not None:
                self.on_epoch(record)

        result = train(exp, self.seed, self.split, device, on_epoch=on_epoch, on_batch=self.on_batch,
                       evaluate_test=False, model=model, loss_fn=loss_fn)
        self.train_time += result.metrics["train_time_s"]
        self.images += len(self.split.train_idx) * (result.metrics["epochs_completed"] + (result.status == "diverged"))
        if result.status == "diverged":
            self.diverged = result.message


def run_compression(exp: Experiment, seed: int, split, device: torch.device, state: dict[str, torch.Tensor],
                    on_epoch: Callable | None = None, on_batch: Callable | None = None):
    """Load ``state`` into the variant's model, prune and/or quantize it, test it: a RunResult whose
    ``model`` is what is deployed and whose metrics include sparsity and the test metrics."""
    from cnnbench.techniques import prune as pr
    from cnnbench.techniques import quantize as qz
    from cnnbench.train import RunResult, initial_model

    model = initial_model(exp, seed, split.data)
    model.load_state_dict(state)
    phases = _Phases(exp, seed, split, on_epoch, on_batch)
    result = RunResult(status="finished")
    described: list[str] = []
    t0 = time.perf_counter()

    if exp.prune is not None:
        p = exp.prune
        if p.method == "channel":
            pr.prune_channels(model, p.amount)
            phases.finetune(model, p.finetune_epochs, device)
        else:
            steps = p.steps if p.schedule == "iterative" else 1
            for _ in range(steps):
                pr.apply_masks(model, p.method, pr.step_amount(p.amount, steps))
                phases.finetune(model, p.finetune_epochs, device)  # masks stay applied while fine-tuning
            pr.make_permanent(model)
        sp = pr.sparsity(model)
        result.metrics["sparsity"] = sp["global"]
        result.artifacts["sparsity.json"] = sp
        described.append(f"prune {p.method} {p.amount:.0%} ({p.schedule}"
                         + (f", {p.steps} steps" if p.schedule == "iterative" else "")
                         + f", {p.finetune_epochs} fine-tune epoch{'s' if p.finetune_epochs != 1 else ''}"
                         + ("; layers rebuilt smaller" if p.method == "channel" else "; masks made permanent") + ")")

    float_model = model
    deployed = model
    if exp.quantize is not None and not phases.diverged:
        q = exp.quantize
        example = _calibration_batches(split, exp.data.batch_size, 1, seed)[0]
        if q.method == "qat":
            deployed = qz.quantize_qat(model, example, lambda m: phases.finetune(m, q.qat_epochs, torch.device("cpu")))
        else:
            calib = _calibration_batches(split, exp.data.batch_size, q.calibration_batches, seed) if q.method == "static" else []
            deployed = qz.quantize_ptq(model, q.method, example, calib)
        described.append(f"quantize {q.method} int8 ({qz.PATH}; {qz.LAYERS[q.method]}"
                         + (f"; {q.calibration_batches} calibration batches" if q.method == "static" else "")
                         + (f"; {q.qat_epochs} QAT epoch{'s' if q.qat_epochs != 1 else ''}" if q.method == "qat" else "")
                         + ")")
        result.tags["cnnbench.quantization_path"] = qz.PATH
    result.metrics["compress_time_s"] = time.perf_counter() - t0 - phases.train_time
    result.tags["cnnbench.compression"] = "; ".join(described)
    result.history = phases.history
    result.metrics.update(
        train_time_s=phases.train_time, epochs_completed=len(phases.history),
        train_throughput=phases.images / phases.train_time if phases.train_time > 0 else float("nan"))
    if phases.diverged:
        result.status, result.message = "diverged", f"fine-tuning {phases.diverged}"
        return result
    result.model = deployed
    result.float_model = float_model
    return result


def distill_loss(exp: Experiment, teacher_model_cfg, state: dict[str, torch.Tensor], data, device):
    """The distillation ``loss_fn`` for ``train``, with the teacher built and loaded on ``device``."""
    from cnnbench.models import build
    from cnnbench.techniques.distill import distillation_loss

    c, h, _ = data.shape
    teacher = build(teacher_model_cfg, in_channels=c, num_classes=data.num_classes, image_size=h)
    teacher.load_state_dict(state)
    d = exp.distill
    return distillation_loss(teacher.to(device), d.temperature, d.alpha, exp.train.label_smoothing)


# ───────────────────────────── measurements of every run ─────────────────────────────


def deployment(exp: Experiment, model: nn.Module, quantized: bool) -> tuple[nn.Module, bool]:
    """What runs at inference: the model, compiled when ``inference.compile`` asks (auto: quantized only)."""
    from cnnbench.techniques.quantize import compiled

    mode = exp.inference.compile
    if mode == "always" or (mode == "auto" and quantized):
        return compiled(model), True
    return model, False


def test_metrics(model: nn.Module, exp: Experiment, split, device: torch.device) -> tuple[dict, list]:
    """Test accuracy, loss and macro P/R/F1, and the confusion matrix (as ``train`` computes them)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from cnnbench.train import evaluate

    data = split.data
    scale, shift = _normalizer(split, device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    idx = torch.arange(len(test_y), device=device)
    loss, acc, preds = evaluate(model, test_x, test_y, idx, scale, shift, exp.data.eval_batch_size, device, want_preds=True)
    y_true = data.test_y.numpy()
    p, r, f1, _ = precision_recall_fscore_support(y_true, preds.numpy(), average="macro", zero_division=0)
    confusion = confusion_matrix(y_true, preds.numpy(), labels=list(range(data.num_classes))).tolist()
    return {"test_accuracy": acc, "test_loss": loss, "precision_macro": p, "recall_macro": r, "f1_macro": f1}, confusion


def finish(result, exp: Experiment, split, device: torch.device) -> None:
    """Test a compressed model (on what is deployed) and add every run's inference metrics."""
    from cnnbench import measure
    from cnnbench.techniques.quantize import inductor_freezing

    if result.status != "finished" or result.model is None or not exp.inference.enabled and not exp.compresses:
        return
    quantized = exp.quantize is not None
    model = result.model
    model.eval()  # not chained: torchao's eval() on exported graphs returns None
    float_model = getattr(result, "float_model", None) or model
    run_device = torch.device("cpu") if quantized else device  # the x86 int8 kernels run on the CPU
    run, is_compiled = deployment(exp, model, quantized)
    with inductor_freezing() if is_compiled else contextlib.nullcontext():
        if exp.compresses:
            metrics, result.confusion = test_metrics(run, exp, split, run_device)
            result.metrics.update(metrics)
        if exp.inference.enabled:
            result.metrics.update(measure.inference_metrics(
                run, float_model, split.data.shape, run_device, exp.inference.repeats, exp.inference.warmup))
            result.metrics["model_size_bytes"] = measure.model_size_bytes(model)
            result.tags["cnnbench.inference"] = (f"{run_device.type}, {torch.get_num_threads()} threads, "
                                                 + ("torch.compile (inductor)" if is_compiled else "eager"))
    if math.isnan(result.metrics.get("train_throughput", 0.0)):
        result.metrics.pop("train_throughput")

