"""Which runs a report shows, and the numbers it takes from them: per-seed values, paired comparisons
with the baseline, time to target, and the tuning runs of the suite's current studies."""

from __future__ import annotations

import json
import math

import pandas as pd

from cnnbench import stats
from cnnbench.config import Suite, plan, study_name
from cnnbench.metrics import CENSORED, metric
from cnnbench.tracking import DONE_STATUSES, ROLE_RUN, ROLE_SEARCH, ROLE_TRIAL


def select_runs(suite: Suite, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per planned (variant, seed): the newest matching run, preferring a finished/diverged one,
    and a tuned run (``tuned`` column) over an untuned one when the suite searches."""
    rows = []
    runs = frame[frame.get("tags.cnnbench.role", pd.Series(dtype=str)) == ROLE_RUN] if not frame.empty else frame
    keys = pd.Series(dtype=str)
    if not runs.empty:  # runs from before plan keys existed are matched on their fingerprint
        keys = runs["tags.cnnbench.fingerprint"]
        if "tags.cnnbench.plan_key" in runs:
            keys = runs["tags.cnnbench.plan_key"].fillna(keys)
    untuned = plan(suite)
    tuned = plan(suite, {v: e for v, e in suite.experiments.items()}) if suite.search is not None else untuned
    if suite.adaptive and not runs.empty:  # seeds of rounds that never started are not missing, just not run
        reached = _looks_reached(suite, runs)
        seeds = suite.seed_list()
        keep = [seeds.index(s.seed) < reached.get(s.variant, reached[None]) for s in untuned]
        untuned = [s for s, k in zip(untuned, keep) if k]
        tuned = [s for s, k in zip(tuned, keep) if k]
    for spec, tuned_spec in zip(untuned, tuned):
        row = {"variant": spec.variant, "seed": spec.seed, "status": "missing", "run_id": None, "tuned": False}
        for key, is_tuned in ((tuned_spec.plan_key, suite.search is not None), (spec.plan_key, False)):
            match = runs[keys == key] if not runs.empty else runs
            if match.empty:
                continue
            match = match.sort_values("start_time", ascending=False)
            done = match[match["tags.cnnbench.status"].isin(DONE_STATUSES) & (match["status"] == "FINISHED")]
            best = done.iloc[0] if not done.empty else match.iloc[0]
            status = best["tags.cnnbench.status"]
            row.update(best.to_dict(), status="failed" if status == "running" else status, tuned=is_tuned)
            row["variant"], row["seed"] = spec.variant, spec.seed
            break
        rows.append(row)
    return pd.DataFrame(rows)


def _looks_reached(suite: Suite, runs: pd.DataFrame) -> dict[str | None, int]:
    """Seed count of the look each variant's runs reached (key None: the suite's, for variants without runs).
    With ``seeds.drop_decided`` a variant decided at an earlier look ran no later rounds: its own look is
    where it ends; otherwise every variant is held to the look the suite reached."""
    seeds, looks = suite.seed_list(), suite.looks()
    seed = pd.to_numeric(runs.get("tags.cnnbench.seed"), errors="coerce")

    def reached(mask) -> int:
        last = max((seeds.index(int(x)) for x in seed[mask].dropna() if int(x) in seeds), default=-1)
        return looks.counts[looks.index(last + 1)]

    out: dict[str | None, int] = {None: reached(seed.notna())}
    if suite.drops_decided and "tags.cnnbench.variant" in runs:
        for variant in suite.variants:
            mask = runs["tags.cnnbench.variant"] == variant
            if mask.any():
                out[variant] = reached(mask)
    return out


def tuning_frame(suite: Suite, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The search run of each variant's current study (one row per variant) and all of its trials."""
    if suite.search is None or frame.empty or "tags.cnnbench.study" not in frame:
        return pd.DataFrame(), pd.DataFrame()
    studies = {study_name(suite, v): v for v in suite.variants}
    current = frame[frame["tags.cnnbench.study"].isin(list(studies))]
    searches = current[current["tags.cnnbench.role"] == ROLE_SEARCH].sort_values("start_time").drop_duplicates(
        "tags.cnnbench.study")
    trials = current[current["tags.cnnbench.role"] == ROLE_TRIAL].copy()
    searches = searches.assign(variant=searches["tags.cnnbench.study"].map(studies))
    trials = trials.assign(variant=trials["tags.cnnbench.study"].map(studies),
                           trial=pd.to_numeric(trials.get("tags.cnnbench.trial"), errors="coerce"))
    return searches, trials


def per_seed(runs: pd.DataFrame, variant: str, metric: str) -> dict[int, float]:
    """seed → value of ``metric`` for the variant's finished runs."""
    col = f"metrics.{metric}"
    if col not in runs:
        return {}
    # two columns, not the run's every param and tag: a report calls this ~100 times (was 9 ms a call)
    fin = runs.loc[(runs["variant"] == variant) & (runs["status"] == "finished"), ["seed", col]]
    values = pd.to_numeric(fin[col], errors="coerce")
    return {int(s): float(v) for s, v in zip(fin["seed"], values) if pd.notna(v)}


def higher_is_better(suite: Suite, name: str) -> bool | None:
    """The catalogue's direction of ``name`` (None: neutral), or the suite's ``report.higher_is_better``
    for its primary metric when that is set."""
    if name == suite.report.primary and suite.report.higher_is_better is not None:
        return suite.report.higher_is_better
    return metric(name).higher_is_better


def primary_higher_is_better(suite: Suite) -> bool:
    """Which way the primary metric is better (a neutral one is read as higher)."""
    return higher_is_better(suite, suite.report.primary) is not False


def seeds_run(runs: pd.DataFrame) -> int:
    """How many of the suite's seeds have runs: the look an adaptive suite has reached."""
    return int(runs.loc[runs["status"] != "missing", "seed"].nunique()) if not runs.empty else 0


def seeds_by_variant(suite: Suite, runs: pd.DataFrame) -> dict[str, int]:
    """How many seeds each variant has runs for, whatever their status: with ``seeds.drop_decided``, the look
    it reached (a diverged or failed seed still counts as run)."""
    return {v: seeds_run(runs.loc[runs["variant"] == v, ["seed", "status"]]) if not runs.empty else 0
            for v in suite.variants}


def comparisons(suite: Suite, runs: pd.DataFrame, floor: float | None = None, metrics: list[str] | None = None,
                detail: bool = True) -> dict[str, dict[str, stats.Paired]]:
    """metric → variant → paired comparison with the baseline (or the variant's ``report.against``
    reference), decided at the α of the look reached.

    Margins come from ``report.margin``; timing metrics use ``report.timing.margin`` unless the suite gives
    them one, and ``floor`` (the relative A/A noise floor of the timing protocol; None: not measured).
    ``metrics``: only these (default: the report's); ``detail=False`` leaves out what no verdict needs (the
    Wilcoxon column, detectable effects) — a stopping decision between rounds reads only verdicts."""
    metrics = list(dict.fromkeys(metrics or [suite.report.primary, *suite.report.metrics]))
    # time to target is censored: compared through the Kaplan–Meier median, not as a paired mean
    metrics = [m for m in metrics if m not in CENSORED]
    looks = suite.looks()
    level_alpha = looks.level(max(seeds_run(runs), 1))
    if suite.drops_decided and not runs.empty:  # each at the α of the look it reached
        level_alpha = {v: looks.level(max(n, 1)) for v, n in seeds_by_variant(suite, runs).items()}
    out = {}
    for m in metrics:
        row = metric(m)
        margin, relative = suite.report.margin_for(m)
        if row.is_speed and margin is None:
            margin, relative = suite.report.timing.relative_margin, True
        values = {v: per_seed(runs, v, m) for v in suite.compared()}
        kind = "timing" if row.is_speed else "deterministic" if row.kind == "deterministic" else "stochastic"
        out[m] = stats.compare_all(values, suite.baseline, suite.report.alpha, higher_is_better(suite, m),
                                   kind=kind, margin=margin, relative_margin=relative, floor=floor,
                                   level_alpha=level_alpha, bounds=row.bounds, references=suite.report.against,
                                   test=suite.report.test, detail=detail)
    primary = suite.report.primary
    for v, r in out.get(primary, {}).items():  # a recipe that diverges on every seed is an answer, not a gap
        reference = suite.reference(v)
        if r.n == 0 and did_not_train(runs, v) and per_seed(runs, reference, primary):
            r.verdict = stats.DIVERGED
        elif r.n == 0 and did_not_train(runs, reference) and per_seed(runs, v, primary):
            r.verdict = "better" if higher_is_better(suite, primary) is not False else "worse"
            r.notes.append(f"`{reference}` diverged on every seed it ran; `{v}` trained")
    return out


def did_not_train(runs: pd.DataFrame, variant: str) -> bool:
    """Every run of ``variant`` that ran diverged."""
    ran = runs.loc[(runs["variant"] == variant) & runs["status"].isin(["finished", "diverged", "failed"]), "status"]
    return not ran.empty and (ran == "diverged").all()


def waited_for(suite: Suite) -> list[str]:
    """The metrics an adaptive suite waits for: the primary one, and every metric the suite gives a margin."""
    return list(dict.fromkeys([suite.report.primary] + (list(suite.report.margin)
                                                        if isinstance(suite.report.margin, dict) else [])))


def decided(suite: Suite, comps: dict[str, dict[str, stats.Paired]]) -> bool:
    """Whether every comparison an adaptive suite waits for (:func:`waited_for`) is decided."""
    return all(r.decided for m in waited_for(suite) if m in comps for r in comps[m].values())


def time_to_target(runs: pd.DataFrame, variant: str) -> stats.TimeToTarget:
    """Censored at the run's training time when a finished or diverged run never reached the target."""
    sub = runs[(runs["variant"] == variant) & runs["status"].isin(["finished", "diverged"])]
    if "metrics.time_to_target_s" not in sub:
        return stats.TimeToTarget(0, 0, math.inf)
    t = pd.to_numeric(sub["metrics.time_to_target_s"], errors="coerce")
    total = pd.to_numeric(sub.get("metrics.train_time_s"), errors="coerce")
    return stats.time_to_target(t.dropna().tolist(), total[t.isna()].dropna().tolist())


def ttt_by_seed(suite: Suite, runs: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """variant → seed → time to target (None: not reached), for the profiles in the index."""
    out = {}
    for variant in suite.variants:
        sub = runs[(runs["variant"] == variant) & runs["status"].isin(["finished", "diverged"])]
        col = sub.get("metrics.time_to_target_s", pd.Series(index=sub.index, dtype=float))
        out[variant] = {str(int(s)): (None if pd.isna(t) else round(float(t), 4)) for s, t in zip(sub["seed"], col)}
    return out


def common(suite: Suite, get) -> object:
    """``get(experiment)`` when every variant has the same value, else None."""
    values = {json.dumps(get(e), default=str) for e in suite.experiments.values()}
    return get(next(iter(suite.experiments.values()))) if len(values) == 1 else None
