"""The timing protocol: the trained models of the suite's first seed — baseline and variants — timed side by
side in interleaved rounds in one process, the baseline entered twice (A/A) for the machine's noise floor.

One training run per variant is not a timing comparison on a shared machine: the same configuration trains
in 7.5 s in one suite and 9.4 s in another. The runner keeps each finished model of the first seed
(``keep``); once the baseline and the variants are in, ``record`` times them (``timing.interleaved_latency``)
and writes a ``timing`` run in MLflow with every round in ``timing.json``. The report reads it back
(``report.timing``) and decides there; nothing is decided here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from cnnbench.config import RunSpec, Suite
from cnnbench.tracking import ROLE_TIMING, TIMING_ARTIFACT, Tracker

AA_SUFFIX = " (A/A)"


@dataclass
class Kept:
    variant: str
    run_id: str
    plan_key: str
    model: object
    device: object
    input_shape: tuple[int, ...]


class SideBySide:
    """Collects the first seed's deployed models as their runs finish, and times them once."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.settings = suite.report.timing
        self.seed = suite.seed_list()[0]
        self.kept: dict[str, Kept] = {}
        self.recorded = False

    def wants(self, spec: RunSpec) -> bool:
        return (self.settings.enabled and not self.recorded and spec.seed == self.seed
                and spec.experiment.inference.enabled and len(self.suite.variants) > 1)

    def keep(self, spec: RunSpec, run_id: str, result, device, input_shape: tuple[int, ...]) -> None:
        """Hold a finished run's deployed model (quantized ones run on the CPU, as they are deployed)."""
        if not self.wants(spec) or result.status != "finished" or result.model is None:
            return
        import torch

        run_device = torch.device("cpu") if result.quantized else device
        self.kept[spec.variant] = Kept(spec.variant, run_id, spec.plan_key, result.model, run_device,
                                       tuple(input_shape))

    def ready(self) -> bool:
        return not self.recorded and self.suite.baseline in self.kept and len(self.kept) > 1

    def record(self, tracker: Tracker, exp_id: str, parent: str) -> str | None:
        """Time the kept models and record them; returns a line for the user, or None when there is nothing
        to time (the baseline's run of the first seed was reused from an earlier invocation, or failed)."""
        if not self.ready():
            return None
        from cnnbench.techniques.quantize import compiled, inductor_freezing
        from cnnbench.timing import LoadMonitor, interleaved_latency

        base = self.kept[self.suite.baseline]
        same = {v: k for v, k in self.kept.items() if k.device == base.device and k.input_shape == base.input_shape}
        names = {self.suite.baseline: base} | {v: k for v, k in same.items() if v != self.suite.baseline}
        names[self.suite.baseline + AA_SUFFIX] = dataclasses.replace(base, model=_copy(base.model))  # last: not
        # always right after the baseline, whose weights it would find in the caches
        s = self.settings
        times = {}
        with LoadMonitor() as monitor:
            for form in s.forms:
                if form == "compiled":
                    models = {n: compiled(k.model) for n, k in names.items()}  # a fresh wrapper each, A/A too
                    context = inductor_freezing()
                else:
                    models = {n: k.model for n, k in names.items()}
                    context = contextlib.nullcontext()
                with context:
                    measured = interleaved_latency(models, base.input_shape, base.device, batch_sizes=(1, 64),
                                                   rounds=s.rounds, calls_per_round=s.calls_per_round,
                                                   warmup=s.warmup, seed=self.seed)
                times[form] = {n: {str(bs): t for bs, t in by_bs.items()} for n, by_bs in measured.items()}
        load = dataclasses.asdict(monitor.result) | {"loaded": monitor.result.loaded}
        data = {
            "seed": self.seed, "baseline": self.suite.baseline, "aa": self.suite.baseline + AA_SUFFIX,
            "forms": list(s.forms), "rounds": s.rounds, "calls_per_round": s.calls_per_round, "warmup": s.warmup,
            "device": str(base.device),
            "models": {n: {"variant": k.variant, "run_id": k.run_id, "plan_key": k.plan_key} for n, k in names.items()},
            "left_out": sorted(set(self.kept) - set(same)),  # another device (int8 on the CPU) or input shape
            "times_ms": times, "load": load,
        }
        run_id = tracker.start_run(exp_id, f"timing seed{self.seed}",
                                   {"cnnbench.suite": self.suite.name, "cnnbench.role": ROLE_TIMING,
                                    "cnnbench.seed": str(self.seed), "cnnbench.status": "finished",
                                    "cnnbench.loaded": str(monitor.result.loaded).lower()}, parent)
        tracker.log(run_id, metrics=monitor.result.metrics(), params={"forms": ",".join(s.forms), "rounds": s.rounds})
        tracker.log_artifacts(run_id, {TIMING_ARTIFACT: data})
        tracker.end_run(run_id, "FINISHED")
        self.recorded = True
        self.kept.clear()  # the models are not needed any more
        return (f"timed {len(names)} models of seed {self.seed} side by side ({', '.join(s.forms)}; "
                f"{s.rounds} interleaved rounds, A/A included)"
                + (" — the machine was loaded" if monitor.result.loaded else ""))


def _copy(model):
    """A separate copy of the baseline for the A/A pair (its own tensors, as any other model has); the same
    object where it cannot be copied."""
    import copy

    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - e.g. a module holding something deepcopy refuses
        return model
