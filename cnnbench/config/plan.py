"""Planning: a valid suite → the (variant, seed) runs to execute, in seed-major order; the identities
that make a stored run reusable (fingerprints, plan keys, study names); and the references between
variants (the source a post-training technique starts from, a distillation teacher)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cnnbench import techniques
from cnnbench.config.schema import FINGERPRINT_VERSION, Experiment, Suite
from cnnbench.techniques.base import Reference

TUNING_SEED_BASE = 10_000  # search trials train on seeds 10000, 10001, …: never the evaluation seeds


@dataclass(frozen=True)
class RunSpec:
    """One (variant, seed) training run of a suite — or, with ``trial`` set, one search trial."""

    suite: str
    variant: str
    seed: int
    experiment: Experiment = field(compare=False)
    is_baseline: bool = False
    plan_key: str = ""  # identity of the planned run (untuned config + seed + study): what reports select on
    study: str | None = None  # the Optuna study whose best params ``experiment`` carries
    trial: int | None = None
    skip_reason: str | None = None  # recorded as skipped instead of trained (e.g. a search with no complete trial)

    @property
    def run_name(self) -> str:
        return f"{self.variant}/trial{self.trial}" if self.trial is not None else f"{self.variant}/seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """Identity of the config actually trained (tuned values included): a finished run with it is reused."""
        return self.experiment.fingerprint(self.seed)


def search_fingerprint(suite: Suite, variant: str) -> str:
    """Identity of a variant's search: its config, space, sampler, pruner, metric — not the trial count."""
    blob = json.dumps({
        "v": FINGERPRINT_VERSION,
        "search": suite.search.model_dump(mode="json", exclude={"trials", "space"}),
        "space": {k: v.model_dump(mode="json") for k, v in sorted(suite.search_space(variant).items())},
        "config": suite.experiments[variant].identity(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def study_name(suite: Suite, variant: str) -> str:
    """``<suite>.<variant>.<search fingerprint>``: resumed while nothing but the trial count changes."""
    return f"{suite.name}.{variant}.{search_fingerprint(suite, variant)}"


def plan(suite: Suite, tuned: dict[str, Experiment | None] | None = None) -> list[RunSpec]:
    """Seed-major order: every variant of seed 0, then seed 1, … (paired results arrive early).

    ``tuned`` maps a variant to its experiment with the best searched values (``None``: its search
    completed no trial, so its runs are planned as skipped). Without it the suite's own values run.
    """
    specs = []
    for seed in suite.seed_list():
        for name in suite.variants:
            exp, key, study, skip = suite.experiments[name], suite.experiments[name].fingerprint(seed), None, None
            if tuned is not None and name in tuned:
                study = study_name(suite, name)
                key = hashlib.sha256(f"{key}|{study}".encode()).hexdigest()[:16]
                if tuned[name] is None:
                    skip = f"search {study} completed no trial: nothing to evaluate"
                else:
                    exp = tuned[name]
            specs.append(RunSpec(suite.name, name, seed, exp, name == suite.baseline, key, study, None, skip))
    return specs


def json_schema() -> dict:
    return Suite.model_json_schema()


# ───────────────────────────── references between variants ─────────────────────────────


def source_of(suite: Suite, variant: str) -> str | None:
    """Where a post-training variant's weights come from: a variant name or a checkpoint reference."""
    exp = suite.experiments[variant]
    if not exp.compresses:
        return None
    return exp.start_from or suite.baseline


def references(suite: Suite, variant: str) -> list[Reference]:
    """Everything trained elsewhere that ``variant`` needs: its source, and what its techniques name."""
    exp = suite.experiments[variant]
    refs = [Reference(("start_from",), source_of(suite, variant), "its source")] if exp.compresses else []
    for technique in techniques.active(exp):
        refs += technique.references(exp)
    return refs


def upstream_variants(suite: Suite, variant: str) -> list[str]:
    """The variants whose trained weights this one needs (its source and/or teacher)."""
    return [r.ref for r in references(suite, variant) if r.ref in suite.experiments]
