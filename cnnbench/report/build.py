"""The report file and the index of reports: ``build_report`` queries MLflow, draws the plots and writes
``<reports_dir>/<suite>.md``; ``write_index`` lists every report in ``<reports_dir>/README.md``."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from cnnbench import redact
from cnnbench.architecture_search import recorded_front, with_front
from cnnbench.config import Suite
from cnnbench.metrics import metric
from cnnbench.report.architecture import architecture_lines
from cnnbench.report.plots import (
    compression_plots,
    plot_bars,
    plot_curves,
    plot_forest,
    plot_pareto,
    plot_profiles,
    plot_tuning,
)
from cnnbench.report.prose import (
    answer,
    compression_lines,
    decided_count,
    determinism,
    headline,
    pairing,
    tuning_lines,
)
from cnnbench.report.selection import (
    comparisons,
    primary_higher_is_better,
    seeds_by_variant,
    seeds_run,
    select_runs,
    ttt_by_seed,
    tuning_frame,
)
from cnnbench.report.tables import magnitude, metrics_table, n_of, to_markdown, verdict_table
from cnnbench.report.timing import timing_record
from cnnbench.tracking import ROLE_SUITE, Tracker

META_PREFIX = "<!-- cnnbench-report "


def build_report(suite: Suite, tracker: Tracker, reports_dir: str | Path = "reports") -> Path:
    """Write ``<reports_dir>/<suite>.md`` and its PNGs from the runs in MLflow; refresh the index."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    frame = tracker.runs_frame(suite.name)
    front = recorded_front(suite, frame)  # an architecture search's retrained members join as variants
    suite = with_front(suite, front)
    runs = select_runs(suite, frame)
    finished = runs[runs["status"] == "finished"]
    history = tracker.history(finished["run_id"].tolist(), ["val_accuracy", "train_time_cum_s", "train_loss", "val_loss"])
    curves, bars = reports_dir / f"{suite.name}_curves.png", reports_dir / f"{suite.name}_bars.png"
    has_curves = plot_curves(suite, runs, history, curves)
    has_bars = plot_bars(suite, runs, bars)
    timing = timing_record(suite, frame, runs, tracker)
    comps = comparisons(suite, runs, floor=timing.floor if timing is not None else None)
    table = verdict_table(suite, runs, comps)
    forest, pareto = reports_dir / f"{suite.name}_forest.png", reports_dir / f"{suite.name}_pareto.png"
    has_forest = plot_forest(suite, comps, forest)
    has_pareto = plot_pareto(suite, runs, pareto)
    tradeoffs = compression_plots(suite, runs, reports_dir)  # accuracy vs latency / size
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
    summary = answer(suite, runs, comps, timing)
    wall_s = suite_wall_s(parents, used_parents)
    decided, made = decided_count(suite, comps)
    margin = suite.report.margin_for(suite.report.primary)[0]
    meta = {"name": suite.name, "question": suite.question, "generated": generated, "primary": suite.report.primary,
            "answer": summary, "headline": headline(suite, comps), "decided": decided, "comparisons": made,
            "margin": magnitude(margin, metric(suite.report.primary)) if margin is not None else None,
            "seeds": seeds_run(runs), "wall_s": wall_s, "cpu": cpu_label(env),
            "time_to_target": ttt_by_seed(suite, runs)}

    lines = [
        f"{META_PREFIX}{json.dumps(meta)} -->",
        f"# {suite.name}",
        "",
        f"**Question.** {suite.question}",
        "",
        f"**Answer.** {summary}",
        "",
    ]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| dataset | {datasets} (batch {exp0.data.batch_size}, validation {exp0.data.val_fraction:.0%} of train"
        + (f", first {exp0.data.limit_train} training images" if exp0.data.limit_train else "") + ") |",
        f"| budget | {len(suite.variants)} variants × "
        + (_adaptive_budget(suite, runs) if suite.adaptive else f"{len(suite.seed_list())} seeds")
        + f" × {'/'.join(map(str, epochs))} epochs"
        f" = {len(runs)} runs, {total_train:.1f} s of training in all |",
        f"| baseline | `{suite.baseline}`: {exp0.model.name}, {exp0.optimizer.name} lr {exp0.optimizer.lr:g}, "
        f"{exp0.schedule.name} schedule |",
        f"| primary metric | {suite.report.primary} ({'higher' if primary_higher_is_better(suite) else 'lower'} is better) |",
        f"| runs from | {last_run} (newest suite run); report generated {generated} |",
        f"| wall time | {wall_text(wall_s)} for `cnnbench run` to run every run shown here"
        f" ({n_of(len(used_parents), 'invocation')}, searches, timing protocol and MLflow included) |",
        f"| device | {devices}; {cpu_label(env) or '?'}, {env.get('torch_threads', '?')} threads |",
        "",
        "## Results",
        "",
        *results_section(suite, runs, comps, table, frame),
    ]
    if suite.search is not None:
        present = runs[runs["status"] != "missing"]
        plain = sorted(set(present[~present["tuned"].astype(bool)]["variant"]), key=list(suite.variants).index)
        lines += [("Runs of " + ", ".join(f"`{v}`" for v in plain) + " use the values written in the suite, not tuned "
                   "ones (they ran with `--no-search`).") if plain else
                  "Every run uses its variant's tuned values (see Tuning).", ""]
    lines += load_lines(runs)
    problems = runs[runs["status"].isin(["diverged", "failed", "skipped", "killed"])]
    if not problems.empty:
        lines += ["Runs that did not finish:", ""]
        for _, r in problems.iterrows():
            reason = r.get("tags.cnnbench.reason") if isinstance(r.get("tags.cnnbench.reason"), str) else ""
            lines.append(f"- `{r['variant']}/seed{r['seed']}`: {r['status']}{' — ' + reason if reason else ''}")
        lines.append("")
    lines += compression_lines(suite, runs, tradeoffs)
    if timing is not None:
        lines += timing.lines()
    if has_curves or has_bars or has_forest or has_pareto:
        lines += ["## Plots", ""]
        if has_forest:
            lines += [f"![paired differences with confidence intervals]({forest.name})", ""]
        if has_curves:
            lines += [f"![learning curves]({curves.name})", ""]
        if has_bars:
            lines += [f"![{suite.report.primary} per variant]({bars.name})", ""]
        if has_pareto:
            lines += [f"![{suite.report.primary} against training throughput]({pareto.name})", ""]
    if suite.search is not None:
        lines += tuning_lines(suite, searches, trials, tuning_png if has_tuning_plot else None)
    lines += architecture_lines(suite, frame, runs, comps, reports_dir, front)
    lines += ["## Variants", "", "Each variant changes the baseline by:", ""]
    for name, override in suite.variants.items():
        lines.append(f"- `{name}`: " + (f"`{json.dumps(override, separators=(', ', ': '))}`" if override else "baseline"))
    lines += ["", "## Environment", ""]
    env_keys = ["cnnbench", "git_commit", "python", "torch", "torchvision", "mlflow", "platform", "cpu", "cpu_flags", "cpu_count",
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
    tmp.write_text(redact.text("\n".join(lines)))  # nothing it quotes (URIs, reasons, commands) carries a secret
    tmp.replace(path)
    write_index(reports_dir)
    return path


def share_text(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage cut (not rounded) to one decimal: 86 of 108 is 79.6%, never the "80%"
    that rounding to a whole percent would print beside a goal of 80%."""
    return f"{math.floor(1000 * part / whole) / 10:g}%"


def cpu_label(env: dict[str, str]) -> str | None:
    """The CPU's model with the instruction set torch dispatched to, e.g. "AMD EPYC (AVX2)": one model name
    covers machines whose speeds differ several-fold (bf16 is ~2× faster than fp32 with AVX-512 bf16 and ~10×
    slower without), so a wall time means little without it."""
    dispatch = re.search(r"torch dispatch: ([^)]+)\)", env.get("cpu_flags", ""))  # e.g. AVX2, AVX512, NO AVX
    cpu = env.get("cpu")
    return f"{cpu} ({dispatch.group(1)})" if cpu and dispatch and dispatch.group(1) != "unknown" else cpu


def results_section(suite: Suite, runs: pd.DataFrame, comps: dict, table: pd.DataFrame, frame: pd.DataFrame) -> list[str]:
    """The Results section: every variant against the baseline, or, with one variant, its runs alone."""
    details = metrics_table(suite, runs, comps)
    if len(suite.variants) == 1:
        table = table.drop(columns=[c for c in table.columns
                                    if c.startswith("Δ") or c in ("p (adj.)", "verdict", "detectable (80% power)")])
        details = details[["metric", "mean ± sd"]]
        intro = (f"The runs of `{suite.baseline}`, the suite's only variant. The {suite.report.primary} column is the "
                 "mean over finished seeds with a t-interval. Time to target is the Kaplan–Meier median of the training "
                 "time until validation accuracy first reaches the target: runs that never reach it count as censored "
                 "at their training time, not dropped. Diverged, failed and skipped runs are counted in the last column "
                 "and left out of the means.")
        summary = "Every metric: mean ± sd over seeds"
    else:
        margin, _ = suite.report.margin_for(suite.report.primary)
        k = len(suite.compared()) - 1
        intro = (f"Each variant against the baseline, paired by seed. {pairing(suite)} The {suite.report.primary} column "
                 "is the mean over finished seeds with a t-interval. "
                 + (("Δ is the median paired difference with the sign test's interval (order statistics: valid "
                     "whatever the shape of the differences, chosen by the suite because some seeds collapse)"
                     if suite.report.test == "sign" else "Δ is the mean paired difference with a paired t-interval")
                    + (f" that holds for all {k} comparisons at once (Bonferroni)" if k > 1 else ""))
                 + (", at the α spent by the look reached (adaptive seeds)" if suite.adaptive else "")
                 + "; p (adj.) is below α exactly when that interval "
                 "excludes 0. The verdict is better/worse when the interval excludes 0, "
                 + ("equivalent when it lies inside ±margin, " if margin is not None else "")
                 + "inconclusive otherwise"
                 + (" (no margin is set for this metric, so nothing can be called equivalent)" if margin is None else "")
                 + ("; under the sign test 'detectable' counts the differences above and below 0. "
                    if suite.report.test == "sign" else
                    "; 'detectable' is the smallest true difference the comparison finds with 80% power. ")
                 + "Time to target is the Kaplan–Meier median of the training time until validation accuracy first "
                 "reaches the target: runs that never reach it count as censored at their training time, not dropped. "
                 "Diverged, failed and skipped runs are counted in the last column and left out of the means.")
        summary = ("Every metric: paired Δ, p, adjusted p, Wilcoxon p (n ≥ 6), verdict, detectable effect; deterministic "
                   "metrics (parameters, FLOPs, size) are stated, not tested")
    return [intro, "", to_markdown(table), "", determinism(frame), "", f"<details><summary>{summary}</summary>", "",
            to_markdown(details), "", "</details>", ""]


def load_lines(runs: pd.DataFrame) -> list[str]:
    """The machine's load over the runs (recorded per run), and the runs measured on a loaded machine."""
    load = pd.to_numeric(runs.get("metrics.load_avg_1m", pd.Series(dtype=float)), errors="coerce").dropna()
    if load.empty:
        return []
    steal = pd.to_numeric(runs.get("metrics.cpu_steal_fraction", pd.Series(dtype=float)), errors="coerce").dropna()
    loaded = runs[runs.get("tags.cnnbench.loaded", pd.Series(index=runs.index, dtype=object)) == "true"]
    text = (f"Machine load over the runs: 1-minute load average {load.median():.2f} (median; max {load.max():.2f}), "
            f"CPU steal {steal.max() if not steal.empty else float('nan'):.1%} at most. ")
    if loaded.empty:
        return [text + "No run was measured on a loaded machine (load average above CPUs + 1, or CPU steal above 5%).", ""]
    names = ", ".join(f"`{v}/seed{s}`" for v, s in zip(loaded["variant"], loaded["seed"]))
    return [text + f"**Measured on a loaded machine** (load average above CPUs + 1, or CPU steal above 5%): {names} — "
            "their timings are suspect.", ""]


def suite_wall_s(parents: pd.DataFrame, used: set[str]) -> float | None:
    """Wall time of the ``cnnbench run`` invocations whose runs the report shows (summed when a suite was
    resumed or added seeds later): as each logged it, else from its parent run's start and end; None when
    none of them has either (runs from before it was logged)."""
    if parents.empty:
        return None
    used_parents = parents[parents["run_id"].isin(used)]
    logged = pd.to_numeric(used_parents.get("metrics.suite_wall_s", pd.Series(dtype=float)), errors="coerce")
    ended = (pd.to_numeric(used_parents["end_time"], errors="coerce")
             - pd.to_numeric(used_parents["start_time"], errors="coerce")) / 1000  # an invocation that crashed
    walls = logged.fillna(ended).dropna()
    return float(walls.sum()) if not walls.empty else None


def wall_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def report_meta(path: Path) -> dict | None:
    """The metadata a report carries in its first line (name, question, answer, …), or None."""
    first = Path(path).read_text().split("\n", 1)[0]
    if not first.startswith(META_PREFIX):
        return None
    return json.loads(re.sub(r"\s*-->\s*$", "", first.removeprefix(META_PREFIX)))


def report_files(path: Path) -> list[Path]:
    """The report and the images it shows."""
    names = re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", Path(path).read_text())
    return [Path(path), *(Path(path).parent / n for n in dict.fromkeys(names) if (Path(path).parent / n).is_file())]


DECIDED_WORDS = ("better", "worse", "equivalent", "higher", "lower", "diverged")


def verdicts_from_table(text: str) -> dict | None:
    """For a report written before its metadata carried verdicts: the one-line answer and decided count
    read from its Results table (first ``| variant`` table with a ``verdict`` column); None if it has none."""
    lines = text.split("## Results", 1)[-1].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| variant") and "verdict" in line), None)
    if start is None:
        return None
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    at, delta_at = header.index("verdict"), next((i for i, c in enumerate(header) if c.startswith("Δ")), None)
    groups: dict[str, list[str]] = {}
    decided = made = 0
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        verdict = cells[at]
        if verdict == "baseline" or verdict.startswith("too few paired seeds (n=0)"):
            continue
        word = next((w for w in DECIDED_WORDS if verdict.startswith(w)), "undecided")
        made += 1
        decided += word != "undecided"
        delta = cells[delta_at].split(" [")[0].split(" (")[0] if delta_at is not None else ""
        label = verdict if word == "undecided" else word if word != "equivalent" else verdict
        groups.setdefault(label, []).append(f"`{cells[0].strip('*')}` {delta}".strip())
    headline = "; ".join(f"{label}: {', '.join(named)}" for label, named in groups.items())
    out = {"headline": headline, "decided": decided, "comparisons": made}
    if seeds := re.search(r"^\| budget \| \d+ variants? × (\d+) seeds?", text, re.M):
        out["seeds"] = int(seeds.group(1))
    if margin := re.search(r"within ±(\d+(?:\.\d+)? pp)", text):
        out["margin"] = margin.group(1)
    return out


def write_index(reports_dir: str | Path) -> Path:
    """``reports/README.md``, the page to link to: one row per suite's question with its one-line answer,
    how many comparisons it decided, its margin, seeds and wall time (read from each report's metadata
    comment), the share decided across all reports, then the performance profiles of time-to-target."""
    reports_dir = Path(reports_dir)
    rows, metas = [], []
    for md in sorted(reports_dir.glob("*.md")):
        if md.name == "README.md":
            continue
        meta = report_meta(md)
        if meta is None:
            continue
        if "comparisons" not in meta:  # written before the metadata carried verdicts: read its table
            meta |= verdicts_from_table(md.read_text()) or {}
        metas.append(meta)
        made = meta.get("comparisons")
        decided = f"{meta['decided']} of {made}" if made else "–"
        margin = meta.get("margin") or ("none" if "margin" in meta else "–")
        rows.append(f"| [{meta['name']}]({md.name}) | {meta['question']} | {meta.get('headline', '–')} | {decided} | "
                    f"{margin} | {meta.get('seeds', '–')} | {wall_text(meta.get('wall_s'))} |")
    counted = [m for m in metas if m.get("comparisons")]
    decided = sum(m["decided"] for m in counted)
    made = sum(m["comparisons"] for m in counted)
    walls = [m["wall_s"] for m in metas if m.get("wall_s") is not None]
    cpus = sorted({m["cpu"] for m in metas if m.get("cpu") and m.get("wall_s") is not None})
    lines = [
        "# Reports",
        "",
        "Generated by `cnnbench run` / `cnnbench report` from the runs recorded in MLflow. Do not edit by hand. "
        "Each row is one suite's question; the answer lists every variant's verdict against the suite's baseline "
        "with its mean difference in the primary metric (the median, where a suite uses the sign test; the report "
        "has the intervals and the reasons). "
        "*Decided*: comparisons that ended better, worse or equivalent within the margin, fixed before the runs; "
        "*seeds*: how many the suite ran; *wall time*: of the `cnnbench run` that produced the runs shown.",
        "",
        "| report | question | answer | decided | margin | seeds | wall time |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if counted:
        missing = [m["name"] for m in metas if "comparisons" not in m]
        lines += [f"Across {n_of(len(counted), 'report')}: **{decided} of {made} comparisons decided "
                  f"({share_text(decided, made)})**."
                  + (f" Reports written before verdicts were counted ({', '.join(missing)}) are not included."
                     if missing else ""), ""]
    if walls:
        lines += [f"Wall time of the {n_of(len(walls), 'suite')} that recorded it: {wall_text(sum(walls))} in all, on "
                  + (", ".join(cpus) or "an unrecorded CPU") + ".", ""]
    profile = reports_dir / "profiles.png"
    if plot_profiles(metas, profile):
        lines += [
            "## Performance profiles (time to target)",
            "",
            "AlgoPerf-style: for each suite, a case is one seed; a variant's curve at τ is the fraction of cases "
            "in which it reached the suite's validation target within τ× the training time of the fastest variant "
            "of that case. Higher and further left is better; a curve that stays below 1 did not reach the target "
            "in some cases (or was never fastest enough).",
            "",
            f"![performance profiles]({profile.name})",
            "",
        ]
    index = reports_dir / "README.md"
    index.write_text("\n".join(lines))
    return index


def _adaptive_budget(suite: Suite, runs: pd.DataFrame) -> str:
    """"10 seeds (adaptive: 5–10)", or, where decided variants left the later rounds, "5–10 seeds (…)"."""
    per_variant = list(seeds_by_variant(suite, runs).values())
    low, high = min([n for n in per_variant if n] or [0]), max(per_variant or [0])
    span = f"{high}" if low == high else f"{low}–{high}"
    dropped = "; decided variants left the later rounds" if low != high and suite.drops_decided else ""
    return f"{span} seeds (adaptive: {suite.seeds.min}–{suite.seeds.max}{dropped})"

