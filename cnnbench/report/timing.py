"""The timing protocol's record, read back: the interleaved latencies of one seed's models, the A/A noise
floor, and a verdict per variant, form and batch size. Written by :mod:`cnnbench.sidebyside`."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cnnbench import stats
from cnnbench.config import Suite
from cnnbench.tracking import ROLE_TIMING, TIMING_ARTIFACT


@dataclass
class TimingRecord:
    """One timing protocol run: ``times`` is form → model name → batch size → per-round medians (ms)."""

    run_id: str
    seed: int
    baseline: str
    aa: str  # the baseline's second copy
    times: dict[str, dict[str, dict[str, list[float]]]]
    variants: dict[str, str]  # model name → variant
    load: dict
    rounds: int
    calls: int
    alpha: float
    margin: float
    floors: dict[tuple[str, str], float] = field(default_factory=dict)  # (form, batch size) → relative floor
    verdicts: dict[tuple[str, str], dict[str, stats.TimingComparison]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        others = [n for n in self.variants if n not in (self.baseline, self.aa)]
        level = self.alpha / max(1, len(others))  # simultaneous across the variants of one form and batch size
        for form, by_model in self.times.items():
            if self.baseline not in by_model or self.aa not in by_model:
                continue
            for bs, base in by_model[self.baseline].items():
                floor = stats.aa_floor(base, by_model[self.aa][bs], self.alpha)
                self.floors[(form, bs)] = floor
                self.verdicts[(form, bs)] = {
                    self.variants[n]: stats.timing_compare(by_model[n][bs], base, floor, self.margin, level)
                    for n in others if n in by_model and bs in by_model[n]}

    @property
    def floor(self) -> float:
        """The largest A/A floor measured (the noisiest condition): what per-run timing metrics must exceed."""
        finite = [f for f in self.floors.values() if math.isfinite(f)]
        return max(finite) if finite else math.nan

    @property
    def loaded(self) -> bool:
        return bool(self.load.get("loaded"))

    def sentence(self) -> str:
        parts = []
        for (form, bs), verdicts in self.verdicts.items():
            said = ", ".join(f"`{v}` {c.ratio:.2f}× ({c.verdict})" for v, c in verdicts.items())
            parts.append(f"{form} bs{bs} (floor ±{self.floors[(form, bs)]:.1%}): {said}")
        text = (f"Latency, timed side by side in interleaved rounds on seed {self.seed}'s models (variant/baseline): "
                + "; ".join(parts) + ".")
        return text + (" The machine was loaded while it was timed (see Timing)." if self.loaded else "")

    def lines(self) -> list[str]:
        """The report's Timing section."""
        load = self.load
        lines = [
            "## Timing", "",
            f"The trained models of seed {self.seed} — baseline, variants, and the baseline a second time (A/A) — "
            f"were timed in one process in {self.rounds} rounds of {self.calls} calls each, one model after the other "
            "(A, B, C, A′, A, …; the order rotates every round; warm-up first; device synchronized around every "
            "call). Each cell is the variant's latency over the baseline's (geometric mean of the per-round ratios, "
            f"simultaneous {1 - self.alpha:.0%} interval across the variants). The A/A floor is how far the baseline "
            "differs from itself; faster/slower (better/worse) needs the interval beyond it, equivalent needs the "
            f"interval inside ±max({self.margin:.0%}, floor).", "",
            f"Machine while timed: load average {load.get('load_avg_1m', math.nan):.2f} on {load.get('cpus', '?')} "
            f"CPUs, CPU steal {load.get('cpu_steal_fraction', math.nan):.1%}"
            + (" — **loaded: these timings are suspect**." if self.loaded else "."), "",
        ]
        rows = []
        for (form, bs), verdicts in self.verdicts.items():
            for v, c in verdicts.items():
                rows.append({"form": form, "batch": bs, "A/A floor": f"±{self.floors[(form, bs)]:.1%}",
                             "variant": v, "latency ratio [CI]": f"{c.ratio:.3f}× [{c.low:.3f}, {c.high:.3f}]",
                             "verdict": c.verdict})
        if rows:
            lines += [pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
        lines += [f"Timing run `{self.run_id}` (artifact `{TIMING_ARTIFACT}` holds every round).", ""]
        return lines


def timing_record(suite: Suite, frame: pd.DataFrame, runs: pd.DataFrame, tracker) -> TimingRecord | None:
    """The newest timing run whose baseline model is the baseline run the report shows for that seed."""
    if frame.empty or "tags.cnnbench.role" not in frame:
        return None
    timed = frame[frame["tags.cnnbench.role"] == ROLE_TIMING].sort_values("start_time", ascending=False)
    keys = runs.get("tags.cnnbench.plan_key", pd.Series(index=runs.index, dtype=object))
    shown = {(v, int(s)): k for v, s, k in zip(runs["variant"], runs["seed"], keys) if isinstance(k, str)}
    for _, row in timed.iterrows():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                data = json.loads(Path(tracker.download_artifact(row["run_id"], TIMING_ARTIFACT, tmp)).read_text())
            except Exception:  # noqa: BLE001 - a timing run that died before its artifact: skip it
                continue
        models = data["models"]
        base = models[data["baseline"]]
        if shown.get((base["variant"], data["seed"])) != base["plan_key"]:
            continue  # timed models of another plan (the suite changed since)
        variants = {n: m["variant"] for n, m in models.items()
                    if n in (data["baseline"], data["aa"]) or shown.get((m["variant"], data["seed"])) == m["plan_key"]}
        times = {form: {n: t for n, t in by_model.items() if n in variants} for form, by_model in data["times_ms"].items()}
        return TimingRecord(row["run_id"], data["seed"], data["baseline"], data["aa"], times, variants, data["load"],
                            data["rounds"], data["calls_per_round"], suite.report.alpha, suite.report.timing.relative_margin)
    return None
