"""Verdicts that decide, end to end: margins in the schema, adaptive seeds that stop when decided (and only
then), the timing protocol's record and report section, and `cnnbench validate` planning seeds."""

import json
import math
from pathlib import Path

import pytest
from conftest import TINY_SUITE, write_suite
from mlflow import MlflowClient

from cnnbench.config import SuiteError, load_suite


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def runs_of(suite: str, role: str = "run"):
    exp = client().get_experiment_by_name(suite)
    return client().search_runs([exp.experiment_id], f"tags.`cnnbench.role` = '{role}'", max_results=1000)


def suite_text(**edits: str) -> str:
    text = TINY_SUITE
    for old, new in edits.items():
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("margin,expected", [
    ("'0.2 pp'", (0.002, False)), ("'5%'", (0.05, True)), ("{test_accuracy: 0.5 pp, train_time_s: 0.3}", (0.005, False)),
])
def test_margins_are_read_in_the_metrics_units(tmp_path, margin, expected):
    suite = load_suite(write_suite(tmp_path / "s.yaml", TINY_SUITE + f"report: {{margin: {margin}}}\n"))
    assert suite.report.margin_for("test_accuracy") == pytest.approx(expected)
    if "train_time_s" in margin:
        assert suite.report.margin_for("train_time_s") == (0.3, False)
    assert suite.report.margin_for("f1_macro") == (None, False)


@pytest.mark.parametrize("report,words", [
    ("{margin: 0.2}", ["report.margin", "'0.2 pp'"]),  # a bare number for a share would be 20 pp
    ("{margin: {train_time_s: 0.2 pp}}", ["percentage points are for shares"]),
    ("{margin: 'a lot'}", ["'N pp'"]),
    ("{timing: {margin: 0.05}}", ["must be relative"]),
])
def test_bad_margins_name_the_key_and_the_fix(tmp_path, report, words):
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(tmp_path / "s.yaml", TINY_SUITE + f"report: {report}\n"))
    text = str(e.value)
    for w in words:
        assert w in text, text


def test_adaptive_seeds_schema(tmp_path):
    suite = load_suite(write_suite(tmp_path / "s.yaml", suite_text(**{"seeds: 2": "seeds: {min: 3, max: 20}"})))
    assert suite.adaptive and suite.seed_list() == list(range(20)) and suite.looks().counts == (3, 6, 9, 12, 15, 18, 20)
    with pytest.raises(SuiteError, match="max"):
        load_suite(write_suite(tmp_path / "t.yaml", suite_text(**{"seeds: 2": "seeds: {min: 4, max: 3}"})))


DIGITS = """\
name: tiny
question: Does a learning rate of 1e-7 keep a LeNet-5 from learning the digits?
base:
  data: {dataset: digits, batch_size: 64, val_fraction: 0.1}
  model: {name: lenet5}
  optimizer: {name: adam, lr: 0.001}
  train: {epochs: 3, target_accuracy: 0.9}
  device: cpu
variants:
  adam: {}
  other: {}
baseline: adam
"""


def test_adaptive_seeds_stop_once_decided_and_record_the_timing_protocol(cli, workdir):
    """A variant that cannot learn (lr 1e-7) is decided 'worse' at the first look: only 2 of 4 seeds run.
    The timing protocol times seed 0's models side by side (A/A included) and the report shows its verdicts."""
    text = DIGITS.replace("  other: {}", "  frozen: {optimizer: {name: sgd, lr: 1.0e-7}}") + \
        "seeds: {min: 2, max: 4, per_round: 1}\n"
    result = cli("run", write_suite(workdir / "tiny.yaml", text), "--no-report")
    assert result.exit_code == 0, result.output
    assert "round 1: every comparison decided after 2 seeds — stopping" in result.output
    assert sorted({r.data.tags["cnnbench.seed"] for r in runs_of("tiny")}) == ["0", "1"]
    timing = runs_of("tiny", "timing")
    assert len(timing) == 1 and timing[0].data.tags["cnnbench.seed"] == "0"
    data = json.loads(Path(client().download_artifacts(timing[0].info.run_id, "timing.json", str(workdir))).read_text())
    assert set(data["models"]) == {"adam", "adam (A/A)", "frozen"}
    assert all(len(data["times_ms"]["eager"][m]["64"]) == 15 for m in data["models"])
    assert {"load_avg_1m", "cpu_steal_fraction"} <= set(runs_of("tiny")[0].data.metrics)

    report = cli("report", workdir / "tiny.yaml")
    assert report.exit_code == 0, report.output
    md = (workdir / "reports" / "tiny.md").read_text()
    assert "Worse: `frozen`" in md and "looks at 2, 3, 4 seeds" in md
    assert "## Timing" in md and "A/A floor" in md and "| eager  |" in md
    assert "Machine load over the runs: 1-minute load average" in md
    assert "missing" not in md  # seeds of rounds that never ran are not missing runs


def test_adaptive_seeds_run_to_max_when_undecided_and_say_what_would_decide(cli, workdir):
    """Two variants that train identically (only the evaluation batch differs) never differ: no margin can be
    reached with equal differences before the sign-flip test allows it, so every round runs and the report says
    how many seeds would decide."""
    text = DIGITS.replace("  other: {}", "  twin: {data: {eval_batch_size: 128}}") + \
        "seeds: {min: 2, max: 3, per_round: 1}\nreport: {margin: 1 pp}\n"
    result = cli("run", write_suite(workdir / "tiny.yaml", text))
    assert result.exit_code == 0, result.output
    assert "round 1: 1 comparison(s) undecided after 2 seeds (twin) — going on to 3" in result.output
    assert "3 seeds (max) reached; still inconclusive: twin" in result.output
    assert len(runs_of("tiny")) == 6
    md = (workdir / "reports" / "tiny.md").read_text()
    assert "Inconclusive for `twin`" in md and "sign-flip test needs" in md

    plan = cli("validate", workdir / "tiny.yaml")
    assert plan.exit_code == 0, plan.output
    assert "looks at 2, 3 seeds" in plan.output and "twin:" in plan.output and "seeds to detect 1.00 pp" in plan.output


@pytest.mark.parametrize("drop", [True, False])
def test_decided_variants_leave_the_later_rounds_and_keep_their_looks_verdict(cli, workdir, drop):
    """`frozen` is decided (worse) at the first look, `twin` never is: with seeds.drop_decided (the default)
    round 2 runs only `twin` and the baseline it is compared with; `frozen` keeps the verdict of its look, read
    at that look's α, and its unrun seed is not a missing run. With drop_decided: false every variant runs."""
    text = DIGITS.replace("  other: {}", "  twin: {data: {eval_batch_size: 128}}\n  frozen: {optimizer: {name: sgd, lr: 1.0e-7}}") \
        + f"seeds: {{min: 2, max: 3, per_round: 1, drop_decided: {str(drop).lower()}}}\nreport: {{margin: 1 pp}}\n"
    result = cli("run", write_suite(workdir / "tiny.yaml", text))
    assert result.exit_code == 0, result.output
    seeds = {v: sorted(r.data.tags["cnnbench.seed"] for r in runs_of("tiny") if r.data.tags["cnnbench.variant"] == v)
             for v in ("adam", "twin", "frozen")}
    assert seeds["adam"] == seeds["twin"] == ["0", "1", "2"]
    assert seeds["frozen"] == (["0", "1"] if drop else ["0", "1", "2"])
    assert ("going on to 3 with adam, twin" in " ".join(result.output.split())) is drop  # rich wraps lines
    md = (workdir / "reports" / "tiny.md").read_text()
    assert "Worse: `frozen`" in md and "missing" not in md
    if drop:
        assert "2–3 seeds (adaptive: 2–3; decided variants left the later rounds)" in md
        assert "not run in later rounds (`seeds.drop_decided`), and read at that look's α: `frozen` (2 seeds)." in md
        assert "| frozen " in md and "2/0/0/0" in md
    else:
        assert "| budget | 3 variants × 3 seeds (adaptive: 2–3) ×" in md and "drop_decided" not in md


def test_the_progress_total_grows_a_round_at_a_time_and_ends_at_the_runs_done(tmp_path):
    """Adaptive seeds plan one round at a time: the suite's progress total is the runs up to the end of the
    round under way (6, then 2 more for the undecided `twin` and its baseline), not every seed up to max (9)."""
    from cnnbench.events import Events
    from cnnbench.runner import run_suite
    from cnnbench.tracking import Tracker

    class Recorded(Events):
        def __init__(self):
            self.planned, self.started = [], 0

        def round_start(self, planned):
            self.planned.append(planned)

        def run_start(self, spec, index, total):
            self.started += 1
            assert index < total == self.planned[-1]

    text = DIGITS.replace("  other: {}", "  twin: {data: {eval_batch_size: 128}}\n  frozen: {optimizer: {name: sgd, lr: 1.0e-7}}") \
        + "seeds: {min: 2, max: 3, per_round: 1}\nreport: {margin: 1 pp}\n"
    events = Recorded()
    outcome = run_suite(load_suite(write_suite(tmp_path / "tiny.yaml", text)), Tracker(f"sqlite:///{tmp_path}/m.db"),
                        events=events)
    assert events.planned == [6, 8] and events.started == 8 == outcome.counts["finished"]


def test_only_variants_that_stopped_early_are_said_to_have_left_the_later_rounds(tmp_path):
    """A variant whose n is short because a run diverged (`flaky`: 3 seeds run, 2 finished, undecided) is not one
    that left the later rounds (`gone`: decided after 2 of 3 seeds)."""
    from cnnbench import stats
    from cnnbench.report.prose import method_sentence

    suite = load_suite(write_suite(tmp_path / "s.yaml", DIGITS.replace("  other: {}", "  flaky: {}\n  gone: {}")
                                   + "seeds: {min: 2, max: 3, per_round: 1}\n"))
    base = {0: 0.90, 1: 0.91, 2: 0.92}
    results = stats.compare_all({"adam": base, "other": base, "flaky": {0: 0.95, 1: 0.80}, "gone": {0: 0.1, 1: 0.1}},
                                "adam", 0.05, True, margin=0.01)
    assert results["gone"].decided and not results["flaky"].decided and results["flaky"].n == 2
    text = method_sentence(suite, results, {"adam": 3, "other": 3, "flaky": 3, "gone": 2})
    assert "`gone` (2 seeds)" in text and "flaky" not in text


def test_validate_plans_from_a_pilot_when_nothing_is_recorded(cli, workdir):
    path = write_suite(workdir / "tiny.yaml", TINY_SUITE + "report: {margin: 0.5 pp}\n")
    empty = cli("validate", path)
    assert empty.exit_code == 0 and "run a pilot (--pilot 3)" in empty.output
    pilot = cli("validate", path, "--pilot", "2", "--set", "base.train.epochs=1")
    assert pilot.exit_code == 0, pilot.output
    assert "pilot: 2 seeds of every variant" in pilot.output
    assert "adam: Δ" in pilot.output and "sd of paired differences" in pilot.output and "to detect 0.50 pp" in pilot.output
    assert len(runs_of("tiny")) == 4  # the pilot's runs are recorded, and a full run reuses them


def test_progress_prints_a_post_training_run_without_training_throughput(tmp_path, capsys):
    """A pruned variant that did not fine-tune has no training throughput: the line still prints (the
    pruning suite crashed here)."""
    from cnnbench.config import plan
    from cnnbench.progress import RichEvents

    spec = plan(load_suite(write_suite(tmp_path / "s.yaml", TINY_SUITE)))[0]
    events = RichEvents()
    with events:
        events.suite_start(load_suite(tmp_path / "s.yaml"), [spec], 0)
        events.run_end(spec, "finished", {"test_accuracy": 0.9}, "")
        events.run_end(spec, "finished", {"test_accuracy": 0.9, "train_throughput": 1234.0}, "")
    err = capsys.readouterr().err
    assert "test acc 90.00%" in err and "1,234 img/s" in err


def test_adaptive_seeds_are_refused_on_a_shared_queue(cli, workdir):
    text = DIGITS + "seeds: {min: 2, max: 6}\n"
    result = cli("run", write_suite(workdir / "tiny.yaml", text), "--storage", "postgresql://127.0.0.1:5432/nowhere")
    assert result.exit_code == 2 and "adaptive seeds" in result.output and "--set seeds=6" in result.output
    assert not (workdir / "mlflow.db").exists() or client().get_experiment_by_name("tiny") is None


def test_validate_says_when_exact_ties_cannot_be_decided_within_the_seeds():
    """A deterministic transform (fusion, export) equals its reference on every seed; the exact sign-flip test
    then needs more seeds than the t-test, and the plan says so before anything runs."""
    from cnnbench.config import load_suite
    from cnnbench.plan_summary import describe_plan
    from cnnbench.registries import all_registries

    path = Path(__file__).parent.parent / "suites" / "deployment.yaml"
    shipped = load_suite(path, registries=all_registries())
    assert "exact sign-flip test" not in describe_plan(shipped)
    short = load_suite(path, ["seeds.max=8"], registries=all_registries())
    assert "decided by the exact sign-flip test only from 10 seeds at the last look; this suite stops at 8" in describe_plan(short)


def test_validate_says_how_many_seeds_the_sign_test_needs():
    """``report.test: sign`` can exclude 0 only when 2^(1−n) is below the per-comparison level at the last look."""
    from cnnbench.config import load_suite
    from cnnbench.plan_summary import describe_plan
    from cnnbench.registries import all_registries

    path = Path(__file__).parent.parent / "suites" / "deployment.yaml"
    short = load_suite(path, ["seeds.max=8", "report.test=sign"], registries=all_registries())
    assert "the sign test (report.test: sign) can decide a comparison only from 10 seeds" in describe_plan(short)
    with pytest.raises(SuiteError, match="report.test"):
        load_suite(path, ["report.test=wilcoxon"], registries=all_registries())


def test_a_sign_test_suite_reports_the_median_and_its_interval(cli, workdir):
    """``report.test: sign`` end to end: the frozen net loses on every one of 6 seeds, so the sign test's
    interval (2^(1−6) < 0.05) excludes 0; the report names the median and the sign test, not the t-test."""
    text = DIGITS.replace("  other: {}", "  frozen: {optimizer: {name: sgd, lr: 1.0e-7}}").replace("epochs: 3", "epochs: 1") \
        + "seeds: 6\nreport: {margin: 1 pp, test: sign, timing: {enabled: false}}\n"
    result = cli("run", write_suite(workdir / "tiny.yaml", text))
    assert result.exit_code == 0, result.output
    md = (workdir / "reports" / "tiny.md").read_text()
    assert "Δ is the median paired difference with the sign test's interval" in md
    assert "Sign-test intervals of the median paired difference" in md
    row = next(line for line in md.splitlines() if line.startswith("| frozen"))
    assert "worse" in row and "(n=6)" in row
    assert "sign test; 0 up, 6 down" in md


def test_an_inconclusive_sign_test_says_how_many_seeds_on_one_side_would_decide():
    """Session 12's normalization and optimizers reports named only the counts and the interval; the reader
    could not tell how far 10 of 15 was from deciding. At 15 seeds and 11 comparisons (α 0.0118 at the last
    look) it takes 14 of 15 on one side."""
    from cnnbench import stats
    from cnnbench.metrics import metric
    from cnnbench.report.prose import could_detect

    r = stats.paired(dict(enumerate([0.91] * 10 + [0.89] * 5)), dict.fromkeys(range(15), 0.9), 0.0118 / 11,
                     test="sign")
    r.verdict = "inconclusive"
    text = could_detect(r, metric("test_accuracy"))
    assert "10 of 15 paired differences are above 0 and 5 below" in text
    assert "it excludes 0 once 14 of 15 lie on one side" in text


def test_the_stopping_decision_reads_the_same_verdicts_as_the_report_without_its_details():
    """Between rounds only the metrics the suite waits for are compared, without the Wilcoxon column or
    detectable effects: the verdicts are the report's."""
    import numpy as np
    import pandas as pd

    from cnnbench.config import Suite
    from cnnbench.report.selection import comparisons, waited_for

    suite = Suite.model_validate({
        "name": "s", "question": "q", "base": {"data": {"dataset": "digits"}},
        "variants": {"base": {}, "up": {"optimizer": {"lr": 0.02}}, "same": {"optimizer": {"lr": 0.011}},
                     "noisy": {"optimizer": {"lr": 0.012}}},
        "baseline": "base", "seeds": {"min": 4, "max": 8, "per_round": 4},
        "report": {"margin": {"test_accuracy": "1 pp", "test_loss": 0.05}}})
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(8):
        b = 0.9 + 0.01 * rng.standard_normal()
        for v, acc in (("base", b), ("up", b + 0.03 + 0.002 * rng.standard_normal()),
                       ("same", b + 0.001 * rng.standard_normal()), ("noisy", b + 0.05 * rng.standard_normal())):
            rows.append({"variant": v, "seed": seed, "status": "finished", "metrics.test_accuracy": acc,
                         "metrics.test_loss": 1 - acc, "metrics.train_time_s": 1 + rng.random()})
    runs = pd.DataFrame(rows)
    full = comparisons(suite, runs)
    quick = comparisons(suite, runs, metrics=waited_for(suite), detail=False)
    assert waited_for(suite) == ["test_accuracy", "test_loss"] and set(quick) == set(waited_for(suite))
    for m in quick:
        assert {v: r.verdict for v, r in quick[m].items()} == {v: r.verdict for v, r in full[m].items()}
        assert all(math.isnan(r.mde) and math.isnan(r.p_wilcoxon) for r in quick[m].values())
    assert {v: r.verdict for v, r in full["test_accuracy"].items()} == {"up": "better", "same": "equivalent",
                                                                          "noisy": "inconclusive"}


def _with(mean: float, sd: float, n: int, base: float = 0.9) -> tuple[dict, dict]:
    """Variant and baseline over ``n`` seeds whose paired differences have exactly this mean and sd."""
    import numpy as np

    z = np.random.default_rng(0).standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return {s: base + mean + sd * z[s] for s in range(n)}, dict.fromkeys(range(n), base)


def test_an_inconclusive_comparison_that_had_the_power_says_how_many_seeds_would_decide_it():
    """Session 16's schedulers report said "about 20 seeds would detect 0.30 pp" after 24 seeds: the plan was for a
    difference from 0 at full α, while the comparison stayed open because its Δ sat between 0 and the margin. It
    now says so, and how many seeds would decide it at that Δ, spread and level — which the verdict rule confirms."""
    from cnnbench import stats
    from cnnbench.metrics import metric
    from cnnbench.report.prose import could_detect

    margin, sd, n = 0.003, 0.0048, 24
    variant, base = _with(0.5 * margin, sd, n)
    r = stats.compare_all({"b": base, "v": variant}, "b", 0.05, True, margin=margin)["v"]
    assert r.verdict == "inconclusive" and r.seeds_needed <= n < r.seeds_to_decide
    text = could_detect(r, metric("test_accuracy"))
    assert "at this Δ its interval still crosses 0 and ±0.30 pp" in text
    assert f"about {r.seeds_to_decide} seeds would decide it if Δ and the spread stayed as they are" in text
    assert "seeds would detect" not in text
    for k, decided in ((r.seeds_to_decide - 1, False), (r.seeds_to_decide, True)):  # at the level of r's interval
        v, b = _with(0.5 * margin, sd, k)
        assert stats.compare_all({"b": b, "v": v}, "b", 0.05, True, margin=margin)["v"].decided is decided
    late = stats.compare_all({"b": base, "v": variant}, "b", 0.05, True, margin=margin, level_alpha=0.0118)["v"]
    assert late.seeds_to_decide > r.seeds_to_decide > n  # a later look spends less α: its interval is wider
    few = stats.compare_all({"b": dict(list(base.items())[:6]), "v": dict(list(variant.items())[:6])}, "b", 0.05, True,
                            margin=margin)["v"]  # short of power: the plan for the margin, as before
    assert few.seeds_needed > 6 and few.seeds_to_decide is None
    assert f"about {few.seeds_needed} seeds would detect 0.30 pp" in could_detect(few, metric("test_accuracy"))
