"""Multi-objective architecture search: a real Optuna study (journal file), real training on scikit-learn's
digits, a real SQLite MLflow store, and the report read back from it."""

import json

import pytest
import yaml
from mlflow import MlflowClient

from cnnbench.architecture_search import FRONT_TAG, pick_front, study_name
from cnnbench.config import SuiteError, load_suite
from cnnbench.registries import all_registries
from tests.conftest import write_suite

NAS_SUITE = """\
name: nas
question: Does a searched architecture match LeNet-5 at fewer parameters?
base:
  data: {{dataset: digits, batch_size: 128}}
  model: {{name: lenet5}}
  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
  train: {{epochs: 1}}
  device: cpu
variants:
  lenet5: {{}}
  small_cnn: {{model: {{name: simple_cnn, kwargs: {{width: 8, depth: 2}}}}}}
baseline: lenet5
seeds: 2
architecture_search:
  start: small_cnn
  trials: {trials}
  sampler: {sampler}
  population_size: 2
  retrain: 2
  cost: {cost}
  space:
{space}
"""
SPACE = """\
    model.kwargs.width: {type: int, low: 2, high: 16, log: true}
    model.kwargs.depth: {type: int, low: 1, high: 3}
    model.kwargs.kernel: {type: categorical, choices: [3, 5]}
    model.pool: {type: categorical, choices: [max, avg]}"""


def make_suite(tmp_path, trials=4, sampler="nsga2", cost="params", space=SPACE, **replace):
    text = NAS_SUITE.format(trials=trials, sampler=sampler, cost=cost, space=space)
    for old, new in replace.items():
        text = text.replace(old, new)
    return write_suite(tmp_path / "s.yaml", text)


def load(path):
    return load_suite(path, registries=all_registries())


@pytest.mark.parametrize("change, expected", [
    ({"start: small_cnn": "start: smal_cnn"}, "architecture_search.start: 'smal_cnn' is not a variant; did you mean 'small_cnn'"),
    ({"small_cnn: {": "nas_1: {", "start: small_cnn": "start: nas_1"}, "names nas_1, nas_2, … are kept"),
    ({"model.pool: {type: categorical, choices: [max, avg]}": "model.pool: {type: categorical, choices: [max, mox]}"},
     "s.yaml:25: architecture_search.space.model.pool: 'model.pool' is not a setting of variant 'small_cnn' that takes 'mox': Value error, unknown pool 'mox'; did you mean 'max'?"),
    ({"cost: params": "cost: latency"}, "architecture_search.cost"),
])
def test_bad_architecture_searches_are_located(tmp_path, change, expected):
    with pytest.raises(SuiteError) as e:
        load(make_suite(tmp_path, **change))
    assert expected in str(e.value), str(e.value)


def test_front_members_are_spread_by_cost_above_the_floor():
    members = [{"trial": i, "params": {"w": i}, "val_accuracy": a, "cost": c}
               for i, (a, c) in enumerate([(0.5, 10), (0.8, 20), (0.9, 40), (0.95, 80), (0.97, 160)])]
    assert [m["trial"] for m in pick_front(members, 3, None)] == [0, 2, 4]
    assert [m["name"] for m in pick_front(members, 3, None)] == ["nas_1", "nas_2", "nas_3"]
    assert [m["trial"] for m in pick_front(members, 3, 0.85)] == [2, 3, 4]
    assert [m["trial"] for m in pick_front(members, 1, None)] == [4]  # one: the most accurate
    assert [m["trial"] for m in pick_front(members, 9, None)] == [0, 1, 2, 3, 4]
    assert pick_front(members, 3, 0.99) == []


def test_search_retrains_the_front_and_the_report_compares_it(cli, workdir):
    path = make_suite(workdir)
    result = cli("run", path, "-q")
    assert result.exit_code == 0, result.output
    suite = load(path)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")  # absolute: MLflow caches stores by URI
    exp = client.get_experiment_by_name("nas")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags["cnnbench.role"], []).append(r)
    (search,) = by_role["search"]
    assert search.data.tags["cnnbench.study"] == study_name(suite)
    trials = by_role["trial"]
    assert len(trials) == 4 and all(t.data.tags["mlflow.parentRunId"] == search.info.run_id for t in trials)
    complete = [t for t in trials if t.data.tags["cnnbench.trial_state"] == "complete"]
    assert complete and all({"val_accuracy", "params"} <= set(t.data.metrics) for t in complete)

    front = json.loads(search.data.tags[FRONT_TAG])
    assert 1 <= len(front) <= 2 and [m["name"] for m in front] == [f"nas_{i + 1}" for i in range(len(front))]
    assert [m["cost"] for m in front] == sorted(m["cost"] for m in front)
    # no complete trial dominates a front member
    for m in front:
        assert not any(t.data.metrics["val_accuracy"] >= m["val_accuracy"] and t.data.metrics["params"] <= m["cost"]
                       and (t.data.metrics["val_accuracy"], t.data.metrics["params"]) != (m["val_accuracy"], m["cost"])
                       for t in complete)
    seeded = by_role["run"]
    variants = {r.data.tags["cnnbench.variant"] for r in seeded}
    assert variants == {"lenet5", "small_cnn"} | {m["name"] for m in front}
    for m in front:  # each member trains the start variant with its knobs, over the suite's seeds
        mine = [r for r in seeded if r.data.tags["cnnbench.variant"] == m["name"]]
        assert sorted(r.data.tags["cnnbench.seed"] for r in mine) == ["0", "1"]
        assert all(r.data.params[key] == str(value) for r in mine for key, value in m["params"].items())
        assert all(r.data.params["model.name"] == "simple_cnn" for r in mine)
        # the trial's cost is the retrained model's parameter count (same architecture)
        assert all(r.data.metrics["params"] == m["cost"] for r in mine)

    text = (workdir / "reports" / "nas.md").read_text()
    assert "## Architecture search" in text
    assert f"{len(complete)} trials completed" in text and f"{len(front)} retrained" in text
    assert "| `nas_1` |" in text and "hand-designed" in text
    assert (workdir / "reports" / "nas_architectures.png").exists()
    assert "nas_1" in text.split("## Results")[1].split("##")[0]  # compared in the results table too

    # run again: the study is complete and every run is reused; the report is rendered from MLflow alone
    result = cli("run", path, "-q")
    assert result.exit_code == 0, result.output
    again = client.search_runs([exp.experiment_id], max_results=1000)
    assert sum(r.data.tags["cnnbench.role"] == "trial" for r in again) == 4
    assert sum(r.data.tags["cnnbench.role"] == "run" for r in again) == len(seeded)
    (workdir / "reports" / "nas.md").unlink()
    result = cli("report", path)
    assert result.exit_code == 0, result.output
    assert "| `nas_1` |" in (workdir / "reports" / "nas.md").read_text()


def test_more_trials_resume_the_study_and_no_search_uses_the_recorded_front(cli, workdir):
    path = make_suite(workdir, trials=2, sampler="random")
    assert cli("run", path, "-q", "--set", "seeds=1").exit_code == 0
    path = make_suite(workdir, trials=3, sampler="random")
    result = cli("run", path, "-q", "--set", "seeds=1")
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")  # absolute: MLflow caches stores by URI
    exp = client.get_experiment_by_name("nas")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert sum(r.data.tags["cnnbench.role"] == "trial" for r in runs) == 3  # one more, not three
    assert sum(r.data.tags["cnnbench.role"] == "search" for r in runs) == 1  # the same search run
    knobs = [tuple(sorted((k, v) for k, v in r.data.params.items() if k.startswith("model.")))
             for r in runs if r.data.tags["cnnbench.role"] == "trial"]
    assert len(set(knobs)) == 3  # the resumed sampler does not draw the first trials' architectures again
    before = sum(r.data.tags["cnnbench.role"] == "run" for r in runs)
    result = cli("run", path, "-q", "--set", "seeds=1", "--no-search")
    assert result.exit_code == 0, result.output
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert sum(r.data.tags["cnnbench.role"] == "run" for r in runs) == before  # the front's runs reused


def test_a_shared_queue_refuses_an_architecture_search(cli, workdir):
    path = make_suite(workdir)
    result = cli("run", path, "--storage", "sqlite:///optuna.db", "--set", "seeds=2")
    assert result.exit_code != 0
    assert "architecture_search runs in one process" in result.output


def test_plan_and_list_describe_it(cli, workdir):
    path = make_suite(workdir)
    result = cli("validate", path)
    assert result.exit_code == 0, result.output
    assert "architecture search: 4 trials" in result.output
    assert yaml.safe_load(path.read_text())["architecture_search"]["retrain"] == 2
