"""Render a suite's markdown report from MLflow alone (no torch): query → DataFrame → tables + PNGs.

Which runs belong to a report: for each (variant, seed) of the suite as it is now, the newest
run with the same plan key — so editing a variant retires its old runs from the report. When the
suite searches, the runs of its current studies' best values are preferred; untuned runs
(``--no-search``) are shown when there are none, and the table says which.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from cnnbench.config import Suite, plan, study_name
from cnnbench.tracking import DONE_STATUSES, ROLE_RUN, ROLE_SEARCH, ROLE_SUITE, ROLE_TRIAL, Tracker

META_PREFIX = "<!-- cnnbench-report "


# ───────────────────────────── formatting ─────────────────────────────


@dataclass(frozen=True)
class MetricFormat:
    label: str
    fmt: str  # pct | float | seconds | rate | bytes | int

    def __call__(self, v: float) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return {
            "pct": lambda: f"{100 * v:.2f}%",
            "float": lambda: f"{v:.4f}",
            "seconds": lambda: f"{v:.2f} s",
            "rate": lambda: f"{v:,.0f}/s",
            "bytes": lambda: f"{v / 2**20:.1f} MiB",
            "int": lambda: f"{v:,.0f}",
        }[self.fmt]()

    def delta(self, v: float) -> str:
        if v is None or math.isnan(v):
            return "–"
        if self.fmt == "pct":
            return f"{100 * v:+.2f} pp"
        return {"seconds": f"{v:+.2f} s", "rate": f"{v:+,.0f}/s", "bytes": f"{v / 2**20:+.1f} MiB",
                "int": f"{v:+,.0f}"}.get(self.fmt, f"{v:+.4f}")


METRICS = {
    "test_accuracy": MetricFormat("test acc", "pct"),
    "val_accuracy": MetricFormat("val acc", "pct"),
    "precision_macro": MetricFormat("precision (macro)", "pct"),
    "recall_macro": MetricFormat("recall (macro)", "pct"),
    "f1_macro": MetricFormat("F1 (macro)", "pct"),
    "test_loss": MetricFormat("test loss", "float"),
    "train_time_s": MetricFormat("train time", "seconds"),
    "time_to_target_s": MetricFormat("time to target", "seconds"),
    "epochs_to_target": MetricFormat("epochs to target", "float"),
    "train_throughput": MetricFormat("train img/s", "rate"),
    "peak_memory_bytes": MetricFormat("peak memory", "bytes"),
    "params": MetricFormat("params", "int"),
}


def metric_format(name: str) -> MetricFormat:
    return METRICS.get(name, MetricFormat(name, "float"))


def mean_std(values: pd.Series, fmt: MetricFormat) -> str:
    """``mean ± sd`` over seeds (sample std), or the single value."""
    values = values.dropna()
    if values.empty:
        return "–"
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return fmt(values.mean()) if sd == 0 else f"{fmt(values.mean())} ± {fmt(sd)}"


# ───────────────────────────── selecting runs ─────────────────────────────


def select_runs(suite: Suite, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per planned (variant, seed): the newest matching run, preferring a finished/diverged one,
    and a tuned run (``tuned`` column) over an untuned one when the suite searches."""
    rows = []
    runs = frame[frame.get("tags.cnnbench.role", pd.Series(dtype=str)) == ROLE_RUN] if not frame.empty else frame
    keys = runs.get("tags.cnnbench.plan_key", pd.Series(dtype=str)).fillna(runs.get("tags.cnnbench.fingerprint")) \
        if not runs.empty else pd.Series(dtype=str)
    untuned = plan(suite)
    tuned = plan(suite, {v: e for v, e in suite.experiments.items()}) if suite.search is not None else untuned
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


# ───────────────────────────── tables ─────────────────────────────


def summary_table(suite: Suite, runs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The per-variant table (strings) and the numbers behind it (for the summary sentence)."""
    metrics = list(dict.fromkeys([suite.report.primary, *suite.report.metrics]))
    base = runs[(runs["variant"] == suite.baseline) & (runs["status"] == "finished")].set_index("seed")
    table, numbers = [], {}
    for variant in suite.variants:
        sub = runs[runs["variant"] == variant]
        fin = sub[sub["status"] == "finished"]
        counts = sub["status"].value_counts()
        row = {"variant": f"**{variant}** (baseline)" if variant == suite.baseline else variant}
        row["seeds fin/div/fail/skip"] = "/".join(str(int(counts.get(s, 0))) for s in ("finished", "diverged", "failed", "skipped"))
        extra = [f"{int(counts[s])} {s}" for s in ("killed", "missing") if counts.get(s, 0)]
        if extra:
            row["seeds fin/div/fail/skip"] += " (" + ", ".join(extra) + ")"
        for m in metrics:
            col = f"metrics.{m}"
            fmt = metric_format(m)
            values = pd.to_numeric(fin[col], errors="coerce") if col in fin else pd.Series(dtype=float)
            cell = mean_std(values, fmt)
            if m == "time_to_target_s" and not fin.empty:
                cell = f"{cell} ({values.notna().sum()}/{len(fin)} reached)"
            row[fmt.label] = cell
            if m == suite.report.primary:
                row[f"Δ {fmt.label} vs baseline"] = "–" if variant == suite.baseline else _paired_delta(fin, base, col, fmt)
                numbers[variant] = {
                    "mean": values.mean() if not values.empty else float("nan"),
                    "delta": _paired_delta_value(fin, base, col),
                    "n": int(values.notna().sum()),
                }
        table.append(row)
    return pd.DataFrame(table), numbers


def _paired_delta_value(fin: pd.DataFrame, base: pd.DataFrame, col: str) -> tuple[float, float, int]:
    if col not in fin or col not in base or fin.empty:
        return float("nan"), float("nan"), 0
    v = pd.to_numeric(fin.set_index("seed")[col], errors="coerce")
    b = pd.to_numeric(base[col], errors="coerce")
    d = (v - b).dropna()
    return (d.mean() if len(d) else float("nan"), d.std(ddof=1) if len(d) > 1 else float("nan"), len(d))


def _paired_delta(fin, base, col, fmt: MetricFormat) -> str:
    mean, sd, n = _paired_delta_value(fin, base, col)
    if n == 0:
        return "–"
    spread = f" ± {fmt.delta(sd).lstrip('+')}" if n > 1 and not math.isnan(sd) else ""
    return f"{fmt.delta(mean)}{spread} (n={n})"


def to_markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


# ───────────────────────────── plots ─────────────────────────────


def plot_curves(suite: Suite, runs: pd.DataFrame, history: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history.empty:
        return False
    wide = history.pivot_table(index=["run_id", "step"], columns="key", values="value").reset_index()
    wide = wide.merge(runs[["run_id", "variant", "seed"]], on="run_id")
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, variant in enumerate(suite.variants):
        sub = wide[wide["variant"] == variant]
        if sub.empty or "val_accuracy" not in sub:
            continue
        by_epoch = sub.groupby("step")
        mean, sd = by_epoch["val_accuracy"].mean() * 100, by_epoch["val_accuracy"].std(ddof=1).fillna(0) * 100
        color = f"C{i}"
        style = "-" if variant != suite.baseline else "--"
        ax_e.plot(mean.index, mean.values, style, color=color, label=variant, marker="o", ms=3)
        ax_e.fill_between(mean.index, mean - sd, mean + sd, color=color, alpha=0.2)
        if "train_time_cum_s" in sub:
            t = by_epoch["train_time_cum_s"].mean()
            ax_t.plot(t.values, mean.values, style, color=color, label=variant, marker="o", ms=3)
            ax_t.fill_between(t.values, mean - sd, mean + sd, color=color, alpha=0.2)
    for ax, xlabel in ((ax_e, "epoch"), (ax_t, "training time (s, mean over seeds)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    target = _common(suite, lambda e: e.train.target_accuracy)
    if target:
        for ax in (ax_e, ax_t):
            ax.axhline(target * 100, color="grey", lw=0.8, ls=":")
    ax_e.legend(fontsize=8)
    fig.suptitle(f"{suite.name}: validation accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_bars(suite: Suite, runs: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = f"metrics.{suite.report.primary}"
    fin = runs[runs["status"] == "finished"]
    if col not in fin or fin[col].dropna().empty:
        return False
    fmt = metric_format(suite.report.primary)
    scale = 100 if fmt.fmt == "pct" else 1
    names = list(suite.variants)
    values = [pd.to_numeric(fin[fin["variant"] == v][col], errors="coerce").dropna() * scale for v in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 2), 3.6), dpi=110)
    means = [v.mean() if len(v) else float("nan") for v in values]
    sds = [v.std(ddof=1) if len(v) > 1 else 0 for v in values]
    colors = ["grey" if n == suite.baseline else f"C{i}" for i, n in enumerate(names)]
    ax.bar(names, means, yerr=sds, color=colors, capsize=4, alpha=0.85)
    for i, v in enumerate(values):
        ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
    finite = [x for v in values for x in v]
    if finite and min(finite) >= 0:  # bars start at zero: a cut axis would exaggerate differences
        ax.set_ylim(0, max(finite) * 1.08)
    ax.set_ylabel(fmt.label + (" (%)" if fmt.fmt == "pct" else ""))
    ax.set_title(f"{suite.name}: {fmt.label} per variant (mean ± std, dots = seeds)", fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_tuning(suite: Suite, trials: pd.DataFrame, path: Path) -> bool:
    """Optimization history per variant: complete trials, pruned ones at their last value, best so far."""
    if trials.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = suite.search.metric
    fmt = metric_format(metric)
    scale = 100 if fmt.fmt == "pct" else 1
    names = [v for v in suite.variants if v in set(trials["variant"])]
    fig, axes = plt.subplots(1, len(names), sharey=True, figsize=(2.9 * len(names) + 1, 3.2), dpi=110, squeeze=False)
    for ax, variant in zip(axes[0], names):
        t = trials[trials["variant"] == variant].sort_values("trial")
        state = t.get("tags.cnnbench.trial_state", pd.Series(dtype=str))
        done = t[state == "complete"]
        y = pd.to_numeric(done.get("metrics.objective"), errors="coerce") * scale
        ax.scatter(done["trial"], y, s=14, color="C0", label="complete", zorder=3)
        pruned = t[state == "pruned"]
        if not pruned.empty and f"metrics.{metric}" in pruned:
            ax.scatter(pruned["trial"], pd.to_numeric(pruned[f"metrics.{metric}"], errors="coerce") * scale,
                       s=14, marker="x", color="grey", label="pruned (last value)")
        if not y.empty:
            best = y.cummax() if suite.search.direction == "maximize" else y.cummin()
            ax.step(done["trial"], best, where="post", color="C3", label="best so far")
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("trial")
    axes[0][0].set_ylabel(f"validation {fmt.label}" + (" (%)" if fmt.fmt == "pct" else ""))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{suite.name}: optimization history ({suite.search.sampler}, {suite.search.pruner} pruner)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def tuning_lines(suite: Suite, searches: pd.DataFrame, trials: pd.DataFrame, plot: Path | None) -> list[str]:
    """The report's Tuning section: what each variant's equal-budget search found."""
    from cnnbench.search import TUNING_SEED_BASE

    sc = suite.search
    fmt = metric_format(sc.metric)
    seeds = ", ".join(str(TUNING_SEED_BASE + k) for k in range(sc.tuning_seeds))
    lines = [
        "## Tuning", "",
        f"Every variant got the same budget: {sc.trials} trials of the `{sc.sampler}` sampler (seed {sc.sampler_seed}) "
        f"with the `{sc.pruner}` pruner, {sc.direction} {sc.metric} on the validation split after "
        f"{sorted({e.train.epochs for e in suite.experiments.values()})[0]} epochs, tuning seed(s) {seeds}. "
        "Trials never see the test set. The seeded runs above use each variant's best values.", "",
    ]
    if searches.empty:
        return lines + ["No search has been recorded for the current suite yet (or it ran with `--no-search`).", ""]

    def num(row, key, default=0.0):
        v = pd.to_numeric(row.get(f"metrics.{key}"), errors="coerce")
        return default if pd.isna(v) else v

    rows = []
    for _, r in searches.set_index("variant").reindex(list(suite.variants)).dropna(how="all").iterrows():
        best = {k.removeprefix("tags.best."): v for k, v in r.items() if k.startswith("tags.best.") and isinstance(v, str)}
        best_txt = ", ".join(f"{k} = {_short(v)}" for k, v in best.items()) or "–"
        counts = "/".join(str(int(num(r, f"trials_{k}"))) for k in ("complete", "pruned", "failed"))
        rows.append({
            "variant": r.name, "best values": best_txt,
            f"best val {fmt.label}": fmt(num(r, "best_value", float("nan"))) if best else "–",
            "trials complete/pruned/failed": counts,
            "epochs trained": f"{int(num(r, 'epochs_run'))}",
            "epochs saved by pruning": f"{int(num(r, 'epochs_saved_by_pruning'))} ({num(r, 'epochs_saved_fraction'):.0%})",
            "search run": f"`{r['run_id']}`",
        })
    lines += [to_markdown(pd.DataFrame(rows)), ""]
    imp_cols = [c for c in searches if c.startswith("metrics.importance.")]
    if imp_cols:
        imp = searches.set_index("variant")[imp_cols].rename(columns=lambda c: c.removeprefix("metrics.importance."))
        imp = imp.dropna(how="all").apply(lambda col: col.map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"))
        lines += ["Parameter importances (fANOVA, seed pinned; share of the validation metric's variance):", "",
                  to_markdown(imp.reset_index()), ""]
    if plot is not None:
        lines += [f"![optimization history]({plot.name})", ""]
    return lines


def _short(v: str) -> str:
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


# ───────────────────────────── the report ─────────────────────────────


def _common(suite: Suite, get) -> object:
    values = {json.dumps(get(e), default=str) for e in suite.experiments.values()}
    return get(next(iter(suite.experiments.values()))) if len(values) == 1 else None


def _summary_sentence(suite: Suite, numbers: dict) -> str:
    fmt = metric_format(suite.report.primary)
    higher = suite.report.primary_higher_is_better()
    base = numbers.get(suite.baseline, {})
    if not base or not base.get("n"):
        return f"The baseline `{suite.baseline}` has no finished runs yet, so no variant can be compared with it."
    parts = []
    for name, num in numbers.items():
        if name == suite.baseline:
            continue
        mean, sd, n = num["delta"]
        if n == 0:
            parts.append(f"`{name}` has no finished seed paired with the baseline")
            continue
        spread = f" ± {fmt.delta(sd).lstrip('+')}" if n > 1 and not math.isnan(sd) else ""
        parts.append(f"`{name}` {fmt.delta(mean)}{spread} (n={n} paired seed{'s' * (n != 1)})")
    ranked = sorted(((v["mean"], k) for k, v in numbers.items() if v["n"]), reverse=higher)
    best = ranked[0][1] if ranked else None
    head = (f"Baseline `{suite.baseline}`: {fmt(base['mean'])} {fmt.label}. Change vs baseline: "
            + "; ".join(parts) + ". ")
    tail = f"Best mean {fmt.label}: `{best}`. " if best else ""
    return head + tail + (
        "Spreads are the standard deviation over seeds; with few seeds, differences smaller than "
        "the spread are not evidence of an effect (confidence intervals and tests come with the statistics module)."
    )


def build_report(suite: Suite, tracker: Tracker, reports_dir: str | Path = "reports") -> Path:
    """Write ``<reports_dir>/<suite>.md`` and its PNGs from the runs in MLflow; refresh the index."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    frame = tracker.runs_frame(suite.name)
    runs = select_runs(suite, frame)
    finished = runs[runs["status"] == "finished"]
    history = tracker.history(finished["run_id"].tolist(), ["val_accuracy", "train_time_cum_s"])
    curves, bars = reports_dir / f"{suite.name}_curves.png", reports_dir / f"{suite.name}_bars.png"
    has_curves = plot_curves(suite, runs, history, curves)
    has_bars = plot_bars(suite, runs, bars)
    table, numbers = summary_table(suite, runs)
    searches, trials = tuning_frame(suite, frame)
    tuning_png = reports_dir / f"{suite.name}_tuning.png"
    has_tuning_plot = suite.search is not None and plot_tuning(suite, trials, tuning_png)

    parents = frame[frame["tags.cnnbench.role"] == ROLE_SUITE].sort_values("start_time") if not frame.empty else frame
    used_parents = set(runs.get("tags.mlflow.parentRunId", pd.Series(dtype=str)).dropna())
    last = parents.iloc[-1] if not parents.empty else None
    env = {k.removeprefix("params.env."): v for k, v in (last.to_dict() if last is not None else {}).items()
           if k.startswith("params.env.") and isinstance(v, str)}
    devices = ", ".join(sorted(set(runs.get("tags.cnnbench.device", pd.Series(dtype=str)).dropna()))) or "–"
    exp0 = suite.experiments[suite.baseline]
    datasets = ", ".join(sorted({e.data.dataset for e in suite.experiments.values()}))
    epochs = sorted({e.train.epochs for e in suite.experiments.values()})
    total_train = pd.to_numeric(runs.get("metrics.train_time_s", pd.Series(dtype=float)), errors="coerce").sum()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    last_run = (datetime.fromtimestamp(last["start_time"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                if last is not None else "–")
    meta = {"name": suite.name, "question": suite.question, "generated": generated, "primary": suite.report.primary}

    lines = [
        f"{META_PREFIX}{json.dumps(meta)} -->",
        f"# {suite.name}",
        "",
        f"**Question.** {suite.question}",
        "",
        f"**Answer.** {_summary_sentence(suite, numbers)}",
        "",
    ]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| dataset | {datasets} (batch {exp0.data.batch_size}, validation {exp0.data.val_fraction:.0%} of train"
        + (f", first {exp0.data.limit_train} training images" if exp0.data.limit_train else "") + ") |",
        f"| budget | {len(suite.variants)} variants × {len(suite.seed_list())} seeds × {'/'.join(map(str, epochs))} epochs"
        f" = {len(runs)} runs, {total_train:.1f} s of training in all |",
        f"| baseline | `{suite.baseline}`: {exp0.model.name}, {exp0.optimizer.name} lr {exp0.optimizer.lr:g}, "
        f"{exp0.schedule.name} schedule |",
        f"| primary metric | {suite.report.primary} ({'higher' if suite.report.primary_higher_is_better() else 'lower'} is better) |",
        f"| runs from | {last_run} (newest suite run); report generated {generated} |",
        f"| device | {devices}; {env.get('cpu', '?')}, {env.get('torch_threads', '?')} threads |",
        "",
        "## Results",
        "",
        "Mean ± standard deviation over finished seeds. Δ is the mean of the paired differences "
        "(same seed: same data order and, for the same architecture, the same initial weights) "
        "± their standard deviation. Diverged, failed and skipped runs are counted in the seeds column and left out "
        "of the means.",
        "",
        to_markdown(table),
        "",
    ]
    if suite.search is not None:
        present = runs[runs["status"] != "missing"]
        plain = sorted(set(present[~present["tuned"].astype(bool)]["variant"]), key=list(suite.variants).index)
        lines += [("Runs of " + ", ".join(f"`{v}`" for v in plain) + " use the values written in the suite, not tuned "
                   "ones (they ran with `--no-search`).") if plain else
                  "Every run uses its variant's tuned values (see Tuning).", ""]
    problems = runs[runs["status"].isin(["diverged", "failed", "skipped", "killed"])]
    if not problems.empty:
        lines += ["Runs that did not finish:", ""]
        for _, r in problems.iterrows():
            reason = r.get("tags.cnnbench.reason") if isinstance(r.get("tags.cnnbench.reason"), str) else ""
            lines.append(f"- `{r['variant']}/seed{r['seed']}`: {r['status']}{' — ' + reason if reason else ''}")
        lines.append("")
    if has_curves or has_bars:
        lines += ["## Plots", ""]
        if has_curves:
            lines += [f"![learning curves]({curves.name})", ""]
        if has_bars:
            lines += [f"![{suite.report.primary} per variant]({bars.name})", ""]
    if suite.search is not None:
        lines += tuning_lines(suite, searches, trials, tuning_png if has_tuning_plot else None)
    lines += ["## Variants", "", "Each variant changes the baseline by:", ""]
    for name, override in suite.variants.items():
        lines.append(f"- `{name}`: " + (f"`{json.dumps(override, separators=(', ', ': '))}`" if override else "baseline"))
    lines += ["", "## Environment", ""]
    env_keys = ["cnnbench", "git_commit", "python", "torch", "torchvision", "mlflow", "platform", "cpu", "cpu_count",
                "torch_threads"]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {env[k]} |" for k in env_keys if k in env] + [""]
    lines += ["## Reproduce", "", "```", env.get("command") or f"cnnbench run {suite.source}", "```", ""]
    if not runs["run_id"].dropna().empty:
        lines += [
            f"MLflow experiment `{suite.name}` at `{tracker.uri}`; suite runs "
            + ", ".join(f"`{p}`" for p in sorted(used_parents)) + ".",
            "",
            "<details><summary>Run ids</summary>",
            "",
            to_markdown(runs[["variant", "seed", "status", "run_id"]].fillna("–")),
            "",
            "</details>",
            "",
        ]
    path = reports_dir / f"{suite.name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    write_index(reports_dir)
    return path


def write_index(reports_dir: str | Path) -> Path:
    """``reports/README.md``: one line per report, read from each report's metadata comment."""
    reports_dir = Path(reports_dir)
    rows = []
    for md in sorted(reports_dir.glob("*.md")):
        if md.name == "README.md":
            continue
        first = md.read_text().split("\n", 1)[0]
        if not first.startswith(META_PREFIX):
            continue
        meta = json.loads(re.sub(r"\s*-->\s*$", "", first.removeprefix(META_PREFIX)))
        rows.append(f"| [{meta['name']}]({md.name}) | {meta['question']} | {meta['primary']} | {meta['generated']} |")
    text = "\n".join(
        [
            "# Reports",
            "",
            "Generated by `cnnbench run` / `cnnbench report` from the runs recorded in MLflow. Do not edit by hand.",
            "",
            "| report | question | primary metric | generated |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    index = reports_dir / "README.md"
    index.write_text(text)
    return index

