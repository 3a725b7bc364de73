"""Every metric cnnbench records, in one table: how it is shown, which way is better, and how it varies.

Torch-free and importing nothing from cnnbench, so the config, the report and the tests can all read it.
``metric(name)`` is the row of a name; an unknown name raises with the closest known names.

- ``better``: ``higher`` / ``lower`` is better, ``cost`` (lower is better, and it is a property of the
  model: parameters, FLOPs, size) or ``neutral`` (a setting or a count, not a goal).
- ``kind``: ``stochastic`` (varies with the seed: accuracy, loss, epochs), ``timing`` (measured on the
  machine: wall-clock times, rates, memory — differs between repeats of the same seed) or
  ``deterministic`` (the same for every seed of a config: parameters, FLOPs, size).
- ``censored``: missing for runs that never reach the target; a report shows them as a Kaplan–Meier
  median, not a mean.

Per-parameter importances of a search (``importance.<parameter>``) are named after the searched
parameters, so they have no row here.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

FORMATS = ("pct", "float", "seconds", "rate", "bytes", "int", "ms", "kib", "sci")
BETTER = ("higher", "lower", "cost", "neutral")
KINDS = ("stochastic", "timing", "deterministic")


class UnknownMetricError(KeyError):
    """A metric name with no catalogue row; the message lists the closest known names."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    fmt: str  # pct | float | seconds | rate | bytes | int | ms | kib
    better: str  # higher | lower | cost | neutral
    kind: str  # stochastic | timing | deterministic
    censored: bool = False  # missing for runs that never reach the target

    def __post_init__(self) -> None:
        for field, value, allowed in (("fmt", self.fmt, FORMATS), ("better", self.better, BETTER),
                                      ("kind", self.kind, KINDS)):
            if value not in allowed:
                raise ValueError(f"metric '{self.name}': {field} must be one of {', '.join(allowed)}, not '{value}'")

    def __call__(self, v: float | None) -> str:
        """The value as a report shows it (``–`` for a missing or NaN value)."""
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return {
            "pct": lambda: f"{100 * v:.2f}%",
            "float": lambda: f"{v:.4f}",
            "seconds": lambda: f"{v:.2f} s",
            "rate": lambda: f"{v:,.0f}/s",
            "bytes": lambda: f"{v / 2**20:.1f} MiB",
            "int": lambda: f"{v:,.0f}",
            "ms": lambda: f"{v:.2f} ms",
            "kib": lambda: f"{v / 1024:,.1f} KiB",
            "sci": lambda: f"{v:.1e}",
        }[self.fmt]()

    def delta(self, v: float | None) -> str:
        """A signed difference in the metric's unit (percentage points for ``pct``)."""
        if v is None or math.isnan(v):
            return "–"
        if self.fmt == "pct":
            return f"{100 * v:+.2f} pp"
        return {"seconds": f"{v:+.2f} s", "rate": f"{v:+,.0f}/s", "bytes": f"{v / 2**20:+.1f} MiB",
                "int": f"{v:+,.0f}", "ms": f"{v:+.2f} ms", "kib": f"{v / 1024:+,.1f} KiB",
                "sci": f"{v:+.1e}"}.get(self.fmt, f"{v:+.4f}")

    @property
    def is_speed(self) -> bool:
        """A time or a rate measured on the machine: its comparisons must clear the timing protocol's A/A floor."""
        return self.kind == "timing" and (self.fmt in ("seconds", "rate", "ms") or self.name in ("train_gflops", "mfu"))

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The values the metric can take: a share (``pct``) lies in [0, 1], every other catalogued quantity
        is ≥ 0 except settings and search objectives, which may be anything."""
        if self.fmt == "pct":
            return (0.0, 1.0)
        return None if self.better == "neutral" and self.fmt == "float" else (0.0, math.inf)

    @property
    def higher_is_better(self) -> bool | None:
        """True for ``higher``, False for ``lower`` and ``cost``, None for ``neutral``."""
        return {"higher": True, "lower": False, "cost": False}.get(self.better)


_ROWS = (
    # ── quality (test set after training; validation per epoch) ──
    Metric("test_accuracy", "test acc", "pct", "higher", "stochastic"),
    Metric("val_accuracy", "val acc", "pct", "higher", "stochastic"),
    Metric("precision_macro", "precision (macro)", "pct", "higher", "stochastic"),
    Metric("recall_macro", "recall (macro)", "pct", "higher", "stochastic"),
    Metric("f1_macro", "F1 (macro)", "pct", "higher", "stochastic"),
    Metric("test_loss", "test loss", "float", "lower", "stochastic"),
    Metric("val_loss", "val loss", "float", "lower", "stochastic"),
    Metric("train_loss", "train loss", "float", "lower", "stochastic"),
    # ── training cost and speed ──
    Metric("train_time_s", "train time", "seconds", "lower", "timing"),
    Metric("train_time_cum_s", "train time (cumulative)", "seconds", "lower", "timing"),
    Metric("time_to_target_s", "time to target", "seconds", "lower", "timing", censored=True),
    Metric("epochs_to_target", "epochs to target", "float", "lower", "stochastic", censored=True),
    Metric("train_throughput", "train img/s", "rate", "higher", "timing"),
    Metric("compile_time_s", "compile time", "seconds", "lower", "timing"),
    Metric("train_gflops", "train GFLOP/s", "float", "higher", "timing"),
    Metric("mfu", "MFU", "pct", "higher", "timing"),
    Metric("peak_memory_bytes", "peak memory", "bytes", "lower", "timing"),
    # ── how the training loop went (per run) ──
    Metric("lr", "learning rate", "float", "neutral", "deterministic"),
    Metric("epochs_completed", "epochs completed", "int", "neutral", "stochastic"),
    Metric("stopped_early_epoch", "stopped early at epoch", "int", "neutral", "stochastic"),
    Metric("diverged_epoch", "diverged at epoch", "int", "neutral", "stochastic"),
    Metric("resumed_from_epoch", "resumed from epoch", "int", "neutral", "timing"),
    Metric("load_avg_1m", "load average (1 min)", "float", "neutral", "timing"),
    Metric("cpu_steal_fraction", "CPU steal", "pct", "lower", "timing"),
    # ── the model: inference and compression ──
    Metric("params", "params", "int", "cost", "deterministic"),
    Metric("nonzero_params", "non-zero params", "int", "cost", "deterministic"),
    Metric("flops", "FLOPs/sample", "int", "cost", "deterministic"),
    Metric("model_size_bytes", "model size", "kib", "cost", "deterministic"),
    Metric("sparsity", "sparsity", "pct", "higher", "deterministic"),
    Metric("latency_bs1_p50_ms", "latency bs1 p50", "ms", "lower", "timing"),
    Metric("latency_bs1_p95_ms", "latency bs1 p95", "ms", "lower", "timing"),
    Metric("latency_bs64_p50_ms", "latency bs64 p50", "ms", "lower", "timing"),
    Metric("latency_bs64_p95_ms", "latency bs64 p95", "ms", "lower", "timing"),
    Metric("inference_throughput", "inference img/s", "rate", "higher", "timing"),
    Metric("inference_threads", "inference threads", "int", "neutral", "deterministic"),
    Metric("compress_time_s", "compression time", "seconds", "lower", "timing"),
    # ── low-rank factorization ──
    Metric("low_rank_params_before", "low-rank params before", "int", "cost", "deterministic"),
    Metric("low_rank_params_after", "low-rank params after", "int", "cost", "deterministic"),
    Metric("low_rank_layers", "low-rank layers", "int", "neutral", "deterministic"),
    Metric("low_rank_energy_kept", "low-rank energy kept", "pct", "higher", "deterministic"),
    # ── deployment ──
    Metric("deploy_max_abs_diff", "max |Δ output| vs trained", "sci", "lower", "deterministic"),
    # ── search runs and their trials (issue: fair tuning) ──
    Metric("objective", "objective", "float", "neutral", "stochastic"),  # its direction is search.direction's
    Metric("best_value", "best value", "float", "neutral", "stochastic"),
    Metric("best_trial", "best trial", "int", "neutral", "stochastic"),
    Metric("epochs_run", "epochs run", "int", "neutral", "stochastic"),
    Metric("trials_budget", "trials budget", "int", "neutral", "deterministic"),
    Metric("trials_complete", "trials complete", "int", "neutral", "stochastic"),
    Metric("trials_pruned", "trials pruned", "int", "neutral", "stochastic"),
    Metric("trials_failed", "trials failed", "int", "neutral", "stochastic"),
    Metric("epochs_saved_by_pruning", "epochs saved by pruning", "int", "higher", "stochastic"),
    Metric("epochs_saved_fraction", "share of epochs saved by pruning", "pct", "higher", "stochastic"),
    # ── suite runs (one per `cnnbench run`) ──
    *(Metric(f"runs_{s}", f"runs {s}", "int", "neutral", "stochastic")
      for s in ("finished", "diverged", "failed", "skipped", "killed", "reused")),
    Metric("suite_wall_s", "suite wall time", "seconds", "lower", "timing"),
    Metric("mlflow_overhead_s", "time in MLflow", "seconds", "lower", "timing"),
)

CATALOGUE: dict[str, Metric] = {m.name: m for m in _ROWS}
assert len(CATALOGUE) == len(_ROWS), "a metric is catalogued twice"

CENSORED: tuple[str, ...] = tuple(name for name, m in CATALOGUE.items() if m.censored)


def metric(name: str) -> Metric:
    """The catalogue row of ``name``; an unknown name raises :class:`UnknownMetricError` (a KeyError)."""
    try:
        return CATALOGUE[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(CATALOGUE), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownMetricError(f"unknown metric '{name}'{hint}; known metrics: {', '.join(CATALOGUE)}") from None
