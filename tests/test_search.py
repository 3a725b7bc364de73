"""Fair tuning with real Optuna studies (journal file and PostgreSQL) and a real SQLite MLflow store."""

import uuid

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from cnnbench.config import load_suite, study_name
from cnnbench.optuna_storage import open_storage
from cnnbench.registries import all_registries
from cnnbench.runner import run_suite
from cnnbench.tracking import Tracker
from tests.conftest import write_suite

SEARCH_SUITE = """\
name: {name}
question: Does Adam beat SGD when both get the same tuning budget?
base:
  data: {{dataset: digits, batch_size: 128}}
  model: {{name: lenet5}}
  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
  train: {{epochs: 2}}
  device: cpu
search:
  trials: {trials}
  sampler: {sampler}
  sampler_seed: {sampler_seed}
  pruner: {pruner}
  pruner_startup_trials: 1
  space:
{space}
variants:
  sgd: {{}}
  adam: {{optimizer: {{name: adam, momentum: 0.0}}{adam_space}}}
baseline: sgd
seeds: 1
"""
LR_SPACE = "    optimizer.lr: {type: float, low: 1.0e-3, high: 0.1, log: true}"


def make_suite(tmp_path, trials=3, sampler="random", sampler_seed=0, pruner="none", space=LR_SPACE, adam_space="",
               name=None, overrides=()):
    text = SEARCH_SUITE.format(name=name or "tuned", trials=trials, sampler=sampler, sampler_seed=sampler_seed,
                               pruner=pruner, space=space, adam_space=adam_space)
    return load_suite(write_suite(tmp_path / "s.yaml", text), list(overrides), registries=all_registries())


def run(suite, tmp_path, storage=None, **kw):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    storage = storage or str(tmp_path / "optuna.journal")
    return tracker, run_suite(suite, tracker, storage=storage, **kw)


def runs_by_role(tracker, suite_name):
    frame = tracker.runs_frame(suite_name)
    return {role: frame[frame["tags.cnnbench.role"] == role] for role in ("suite", "search", "trial", "run")}


def test_every_variant_gets_the_same_trials_nested_under_its_search_run(tmp_path):
    suite = make_suite(tmp_path, trials=3, adam_space=", search_space: {optimizer.betas.0: {type: float, low: 0.8, high: 0.95}}")
    tracker, outcome = run(suite, tmp_path)
    assert outcome.counts == {"finished": 2}
    storage = open_storage(str(tmp_path / "optuna.journal"))
    studies = {v: optuna.load_study(study_name=study_name(suite, v), storage=storage) for v in suite.variants}
    assert {v: len(s.trials) for v, s in studies.items()} == {"sgd": 3, "adam": 3}
    # the same sampler seed: the shared parameter gets the same first values in every variant
    assert studies["sgd"].trials[0].params["optimizer.lr"] == studies["adam"].trials[0].params["optimizer.lr"]
    assert set(studies["adam"].trials[0].params) == {"optimizer.lr", "optimizer.betas.0"}

    roles = runs_by_role(tracker, "tuned")
    [parent] = roles["suite"]["run_id"]
    searches, trials, finals = roles["search"], roles["trial"], roles["run"]
    assert len(searches) == 2 and (searches["tags.mlflow.parentRunId"] == parent).all()
    assert len(trials) == 6 and set(trials["tags.mlflow.parentRunId"]) == set(searches["run_id"])
    assert sorted(trials["tags.cnnbench.trial"].astype(int)) == [0, 0, 1, 1, 2, 2]
    assert (trials["tags.cnnbench.trial_state"] == "complete").all() and (trials["status"] == "FINISHED").all()
    assert not [c for c in trials.columns if c.startswith("metrics.test_") and trials[c].notna().any()]  # no test set
    assert trials["metrics.val_accuracy"].notna().all() and trials["params.optimizer.lr"].notna().all()
    history = MlflowClient(tracker.client.tracking_uri).get_metric_history(trials["run_id"].iloc[0], "val_accuracy")
    assert [m.step for m in history] == [1, 2]

    # the seeded runs carry each variant's best values, and the search run says which they are
    for variant, study in studies.items():
        search = searches[searches["tags.cnnbench.variant"] == variant].iloc[0]
        final = finals[finals["tags.cnnbench.variant"] == variant].iloc[0]
        assert float(search["tags.best.optimizer.lr"]) == pytest.approx(study.best_params["optimizer.lr"])
        assert float(final["params.optimizer.lr"]) == pytest.approx(study.best_params["optimizer.lr"])
        assert search["metrics.best_value"] == pytest.approx(study.best_value)
        assert search["metrics.trials_complete"] == 3 and final["tags.cnnbench.tuned"] == "true"
        assert final["metrics.test_accuracy"] > 0
    # two parameters and three complete trials: importances (pinned fANOVA) are logged for adam only
    adam = searches[searches["tags.cnnbench.variant"] == "adam"].iloc[0]
    sgd = searches[searches["tags.cnnbench.variant"] == "sgd"].iloc[0]
    assert adam["metrics.importance.optimizer.lr"] + adam["metrics.importance.optimizer.betas.0"] == pytest.approx(1)
    assert pd.isna(sgd.get("metrics.importance.optimizer.lr"))
    assert float(finals[finals["tags.cnnbench.variant"] == "adam"].iloc[0]["params.optimizer.betas"].strip("[]").split(",")[0]) \
        == pytest.approx(studies["adam"].best_params["optimizer.betas.0"])


def test_resume_runs_only_missing_trials_and_reuses_the_search_run(tmp_path):
    suite = make_suite(tmp_path, trials=2)
    tracker, _ = run(suite, tmp_path)
    first = runs_by_role(tracker, "tuned")["search"].set_index("tags.cnnbench.variant")["run_id"].to_dict()

    more = make_suite(tmp_path, trials=3)  # only the budget grew: same studies, one more trial each
    assert study_name(more, "sgd") == study_name(suite, "sgd")
    _, outcome = run(more, tmp_path)
    roles = runs_by_role(tracker, "tuned")
    assert len(roles["trial"]) == 6
    assert roles["search"].set_index("tags.cnnbench.variant")["run_id"].to_dict() == first
    assert (roles["search"]["metrics.trials_complete"] == 3).all()
    for _, trials in roles["trial"].groupby("tags.cnnbench.variant"):  # the resumed sampler draws new values
        assert trials["params.optimizer.lr"].nunique() == 3

    _, again = run(more, tmp_path)  # nothing missing: no trial and no seeded run is redone
    assert len(runs_by_role(tracker, "tuned")["trial"]) == 6
    assert again.counts == {} and again.reused == 2

    changed = make_suite(tmp_path, trials=3, space=LR_SPACE.replace("high: 0.1", "high: 0.2"))
    assert study_name(changed, "sgd") != study_name(suite, "sgd")  # a new space is a new study


def test_raising_and_diverging_trials_are_failed_and_the_search_goes_on(tmp_path):
    space = ("    optimizer.lr: {type: categorical, choices: [1.0e+12, 0.05]}\n"
             "    model.activation: {type: categorical, choices: [relu, no_such_activation]}")
    suite = make_suite(tmp_path, trials=4, sampler="grid", space=space)
    tracker, outcome = run(suite, tmp_path)
    study = optuna.load_study(study_name=study_name(suite, "sgd"), storage=open_storage(str(tmp_path / "optuna.journal")))
    states = {(t.params["optimizer.lr"], t.params["model.activation"]): t.state for t in study.trials}
    assert states == {(0.05, "relu"): TrialState.COMPLETE, (1e12, "relu"): TrialState.FAIL,
                      (0.05, "no_such_activation"): TrialState.FAIL, (1e12, "no_such_activation"): TrialState.FAIL}
    reasons = {t.params["model.activation"]: t.user_attrs["reason"] for t in study.trials if t.state == TrialState.FAIL}
    assert "unknown activation 'no_such_activation'" in reasons["no_such_activation"]
    trials = runs_by_role(tracker, "tuned")["trial"]
    sgd_trials = trials[trials["tags.cnnbench.variant"] == "sgd"]
    assert sorted(sgd_trials["status"]) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]  # diverged: finished, failed state
    assert sorted(sgd_trials["tags.cnnbench.trial_state"]) == ["complete", "failed", "failed", "failed"]
    assert outcome.counts == {"finished": 2}  # the best (0.05, relu) ran on the seed


def test_a_variant_whose_trials_all_fail_is_skipped_with_the_reason(tmp_path):
    space = "    model.kwargs.width: {type: categorical, choices: [0]}"  # valid YAML, fails when the model is built
    suite = make_suite(tmp_path, trials=2, space=space, overrides=["base.model.name=simple_cnn"])
    tracker, outcome = run(suite, tmp_path)
    assert outcome.counts == {"skipped": 2}
    finals = runs_by_role(tracker, "tuned")["run"]
    assert finals["tags.cnnbench.reason"].str.contains("completed no trial").all()


def test_pruned_trials_are_recorded_with_the_epochs_they_saved(tmp_path):
    space = "    optimizer.lr: {type: categorical, choices: [0.05, 1.0e-7]}"
    suite = make_suite(tmp_path, trials=2, sampler="grid", sampler_seed=1, pruner="median", space=space,
                       overrides=["base.train.epochs=3"])
    tracker, _ = run(suite, tmp_path)
    study = optuna.load_study(study_name=study_name(suite, "sgd"), storage=open_storage(str(tmp_path / "optuna.journal")))
    assert [t.params["optimizer.lr"] for t in study.trials] == [0.05, 1e-7]  # the good one first: the bad one is pruned
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    # reports_per_epoch (default 4): the hopeless trial is stopped at its first report, a quarter into epoch 1
    assert study.trials[1].user_attrs["epochs_run"] == 0.25
    assert list(study.trials[1].intermediate_values) == [1]  # one report, at step 1 = 1/4 epoch
    search = runs_by_role(tracker, "tuned")["search"]
    row = search[search["tags.cnnbench.variant"] == "sgd"].iloc[0]
    assert row["metrics.trials_pruned"] == 1 and row["metrics.epochs_saved_by_pruning"] == 3 - study.trials[1].user_attrs["epochs_run"]


def test_mid_epoch_checks_see_the_training_without_changing_it(tmp_path):
    """The validations a pruner sees inside an epoch come at even fractions of it, are not in the training
    time, and leave the run bit-for-bit what it is without them."""
    import torch

    from cnnbench import data as datamod
    from cnnbench.train import train

    exp = load_suite(write_suite(tmp_path / "s.yaml", SEARCH_SUITE.format(
        name="t", trials=1, sampler="random", sampler_seed=0, pruner="median", space=LR_SPACE, adam_space="")),
        registries=all_registries()).experiments["sgd"]
    split = datamod.split(datamod.load(exp.data), exp.data.val_fraction)
    plain = train(exp, 0, split, torch.device("cpu"))
    seen = []
    checked = train(exp, 0, split, torch.device("cpu"), on_check=lambda e, rec: seen.append((e, rec)), checks_per_epoch=4)
    assert [e for e, _ in seen] == [0.25, 0.5, 0.75, 1.25, 1.5, 1.75]
    assert all(0 <= rec["val_accuracy"] <= 1 and rec["val_loss"] > 0 for _, rec in seen)
    assert seen[2][1]["val_accuracy"] > seen[0][1]["val_accuracy"]  # it is the model as it trains
    assert [{k: v for k, v in h.items() if k != "train_time_cum_s"} for h in checked.history] == \
        [{k: v for k, v in h.items() if k != "train_time_cum_s"} for h in plain.history]
    for a, b in zip(plain.model.state_dict().values(), checked.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_two_workers_that_ask_for_the_last_trial_at_once_run_only_one(tmp_path):
    """The race the budget check has with several workers: both saw 3 of 4 trials taken and asked. The trial the
    storage numbered later is ended unrun (FAIL, ``surplus``) and not counted; a re-queued copy of a failed
    trial still runs."""
    from cnnbench.search import _counted, over_budget

    study = optuna.create_study(storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/race.db"))
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, 0.5)
    first, second = study.ask(), study.ask()  # worker A and worker B, at the same moment
    assert not over_budget(study, first, 4)
    assert over_budget(study, second, 4)
    trials = study.get_trials(deepcopy=False)
    assert trials[4].state == TrialState.FAIL and trials[4].user_attrs["surplus"]
    trials = study.get_trials(deepcopy=False)
    assert sum(_counted(t, trials) for t in trials) == 3  # the surplus trial uses none of the budget

    # worker A dies: its trial is failed and re-queued (Optuna's retry callback, as for stale heartbeats);
    # the copy, numbered after the surplus trial, takes the failed one's place and runs
    study.tell(first, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.get_trials(deepcopy=False)[first.number])
    copy = study.ask()
    assert copy.number == 5 and not over_budget(study, copy, 4)
    study.tell(copy, 0.7)
    trials = study.get_trials(deepcopy=False)
    assert sum(_counted(t, trials) for t in trials) == 4


def test_search_on_the_local_postgresql(tmp_path):
    import psycopg  # the README's dev install brings it; a missing driver is a failure, not a skip

    url = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {url}: {e}")
    suite = make_suite(tmp_path, trials=2, name=f"pg_{uuid.uuid4().hex[:8]}")
    storage = open_storage(url)
    try:
        tracker, outcome = run(suite, tmp_path, storage=url)
        assert outcome.counts == {"finished": 2}
        for v in suite.variants:
            assert len(optuna.load_study(study_name=study_name(suite, v), storage=storage).trials) == 2
    finally:
        for v in suite.variants:
            try:
                optuna.delete_study(study_name=study_name(suite, v), storage=storage)
            except KeyError:
                pass


def test_no_search_runs_the_yaml_values_and_the_report_says_so(cli, workdir):
    path = workdir / "s.yaml"
    make_suite(workdir, trials=2)  # writes s.yaml
    result = cli("run", path, "--no-search", "-q")
    assert result.exit_code == 0, result.output
    text = (workdir / "reports" / "tuned.md").read_text()
    assert "use the values written in the suite, not tuned ones" in text
    assert "No search has been recorded" in text
    assert not (workdir / "optuna.journal").exists()

    result = cli("run", path, "-q")
    assert result.exit_code == 0, result.output
    text = (workdir / "reports" / "tuned.md").read_text()
    assert "Every run uses its variant's tuned values" in text
    assert "## Tuning" in text and "| sgd " in text and "2/0/0" in text
    assert (workdir / "reports" / "tuned_tuning.png").exists()
    assert (workdir / "optuna.journal").exists()


@pytest.mark.parametrize("space, adam_space, expected", [
    ("    optimizer.lrr: {type: float, low: 1.0e-3, high: 0.1}", "",
     "s.yaml:16: search.space.optimizer.lrr: 'optimizer.lrr' is not a setting of variant 'sgd'"),
    ("    optimizer.lr: {type: float, low: 0.0, high: 0.1, log: true}", "",
     "s.yaml:16: search.space.optimizer.lr: log: true needs low > 0, got 0.0"),
    (LR_SPACE, ", search_space: {optimizer.betas.5: {type: float, low: 0.8, high: 0.9}}",
     "s.yaml:19: variants.adam.search_space.optimizer.betas.5: 'optimizer.betas.5' is not a setting of variant 'adam'"),
    ("    model.norm: {type: categorical, choices: [batch, nrom]}", "", None),  # only the first choice is checked
])
def test_bad_search_spaces_are_located(tmp_path, space, adam_space, expected):
    from cnnbench.config import SuiteError

    if expected is None:
        make_suite(tmp_path, space=space, adam_space=adam_space)
        return
    with pytest.raises(SuiteError) as e:
        make_suite(tmp_path, space=space, adam_space=adam_space)
    assert any(str(p).endswith(expected) or expected in str(p) for p in e.value.problems), e.value.problems


def test_grid_needs_steps_and_search_space_needs_a_search(tmp_path):
    from cnnbench.config import SuiteError

    with pytest.raises(SuiteError, match="a grid search needs 'step'"):
        make_suite(tmp_path, sampler="grid")
    text = SEARCH_SUITE.format(name="x", trials=1, sampler="tpe", sampler_seed=0, pruner="none", space=LR_SPACE,
                               adam_space=", search_space: {optimizer.lr: {type: float, low: 0.001, high: 0.1}}")
    text = text[: text.index("search:")] + text[text.index("variants:"):]
    with pytest.raises(SuiteError, match="search_space needs a top-level 'search' section"):
        load_suite(write_suite(tmp_path / "s.yaml", text), registries=all_registries())


@pytest.mark.slow
def test_interrupted_trial_is_killed_not_counted_and_run_again(workdir):
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    text = SEARCH_SUITE.format(name="interrupted", trials=2, sampler="random", sampler_seed=0, pruner="none",
                               space=LR_SPACE, adam_space="").replace("epochs: 2", "epochs: 25")
    text = text.replace("  adam: {optimizer: {name: adam, momentum: 0.0}}\n", "")
    path = write_suite(workdir / "s.yaml", text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cnnbench", "run", str(path), "-q", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    query = ("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
             "WHERE t.key = 'cnnbench.role' AND t.value = 'trial' AND r.status = 'RUNNING'")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with sqlite3.connect(f"file:{workdir / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as con:
                    if con.execute(query).fetchone()[0]:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.2)
        time.sleep(0.5)  # into the first epochs
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    tracker = Tracker(f"sqlite:///{workdir}/mlflow.db")
    roles = runs_by_role(tracker, "interrupted")
    assert list(roles["trial"]["status"]) == ["KILLED"] and list(roles["search"]["status"]) == ["KILLED"]
    suite = load_suite(path, registries=all_registries())
    storage = open_storage(str(workdir / "optuna.journal"))
    [killed] = optuna.load_study(study_name=study_name(suite, "sgd"), storage=storage).trials
    assert killed.state == TrialState.FAIL and killed.user_attrs["interrupted"]

    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name=study_name(suite, "sgd"), storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    roles = runs_by_role(tracker, "interrupted")
    assert list(roles["search"]["status"]) == ["FINISHED"] and roles["search"]["metrics.trials_complete"].item() == 2
    assert sorted(roles["trial"]["status"]) == ["FINISHED", "FINISHED", "KILLED"]
