"""Command line: parse, call the library, print. Heavy imports happen inside commands."""

from __future__ import annotations

import contextlib
import signal
import sys

import click

EXIT_OK, EXIT_FAILED_RUNS, EXIT_BAD_INPUT, EXIT_TRACKING_LOST, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# MLflow 3.17's UI starts in its GenAI view whatever an experiment's kind says (a per-browser switch): a
# link with this query opens the model-training view (checked in headless Chromium)
UI_VIEW = "workflowType=machine_learning"

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a suite value by dotted key, typed as YAML (repeatable): --set base.train.epochs=1 --set seeds=1",
)
uri_option = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                          help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db]")
data_dir_option = click.option("--data-dir", envvar="CNNBENCH_DATA_DIR", default=None, type=click.Path(file_okay=False),
                               help="Where datasets live (torchvision layout) [env CNNBENCH_DATA_DIR; default ./data]")
reports_option = click.option("--reports-dir", default="reports", show_default=True, type=click.Path(file_okay=False),
                              help="Where reports are written")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(suite_path: str, overrides: tuple[str, ...], check_names: bool = True):
    """Load and validate a suite, or print every problem and exit 2."""
    from cnnbench.config import SuiteError, load_suite

    registries = None
    if check_names:
        from cnnbench.registries import all_registries

        registries = all_registries()
    try:
        suite = load_suite(suite_path, overrides, registries=registries)
        for warning in suite.warnings:
            click.echo(f"warning: {warning}", err=True)
        return suite
    except SuiteError as e:
        click.echo(f"error: invalid suite ({len(e.problems)} problem{'s' * (len(e.problems) != 1)}):", err=True)
        for p in e.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(EXIT_BAD_INPUT)


def _tracker(uri: str | None):
    from cnnbench.tracking import Tracker, TrackingUnavailable, resolve_uri

    try:
        return Tracker(resolve_uri(uri))
    except TrackingUnavailable as e:
        _fail(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cnnbench")
def main() -> None:
    """cnnbench: does a CNN training trick help, by how much, and at what cost?

    Run a YAML suite (a baseline and variants that each change one thing, over several seeds),
    record every run in MLflow, and write a markdown comparison report.
    """
    from cnnbench import redact

    redact.scan(*sys.argv)  # a password on the command line (--storage, --tracking-uri) is masked from here on
    redact.guard_streams()  # progress, errors and tracebacks: masked on their way to the terminal


@main.command()
@click.argument("suite", type=click.Path())
@set_option
@uri_option
@data_dir_option
@reports_option
@click.option("--rerun", is_flag=True, help="Run again (variant, seed) pairs that already finished with the same config.")
@click.option("--device", default=None, help="Force a device for every run (cpu, cuda, cuda:N, mps, xla); an absent one is an error.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
@click.option("--no-report", is_flag=True, help="Do not write the report.")
@click.option("--no-search", is_flag=True, help="Skip the suite's Optuna search: run the values written in the YAML.")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage: a journal file path (searches only), or an RDB URL (postgresql://…, sqlite:///…): "
                   "then this process is one worker of a shared queue — start the same command on N machines "
                   "[default: optuna.journal beside the SQLite MLflow store].")
@click.option("--heartbeat", "heartbeat_s", default=10, show_default=True, type=click.IntRange(min=1), metavar="SECONDS",
              help="With an RDB --storage: how often a worker records a heartbeat for the run it holds.")
@click.option("--grace-period", "grace_s", default=60, show_default=True, type=click.IntRange(min=1),
              metavar="SECONDS", help="With an RDB --storage: a run whose worker sent no heartbeat for this long is "
                                      "failed and re-queued for another worker.")
@click.option("--checkpoints", default="local", show_default=True, envvar="CNNBENCH_CHECKPOINTS",
              metavar="local|mlflow|DIR",
              help="Where each run keeps its per-epoch training state [env CNNBENCH_CHECKPOINTS]: local (beside the "
                   "SQLite store, else ./checkpoints), mlflow (also uploaded to the run's MLflow artifacts after "
                   "each save: a run re-queued to another machine resumes from it), or a directory all workers share.")
@click.option("--checkpoint-every", "checkpoint_every", default=None, type=click.FloatRange(min=0),
              envvar="CNNBENCH_CHECKPOINT_EVERY", metavar="SECONDS",
              help="A run saves its training state after an epoch once this many seconds have passed since its start "
                   "or last save (0: every epoch) [env CNNBENCH_CHECKPOINT_EVERY]: a killed run redoes at most that "
                   "much, and runs shorter than this save nothing  [default: 10]")
def run(suite, overrides, tracking_uri, data_dir, reports_dir, rerun, device, quiet, no_report, no_search, storage,
        heartbeat_s, grace_s, checkpoints, checkpoint_every):
    """Run SUITE (a YAML file), log every run to MLflow and write reports/<name>.md.

    A suite with a `search` section first tunes every variant with the same Optuna budget (only
    missing trials run when repeated), then runs each variant's best values on every seed.
    """
    queue = None
    from cnnbench.optuna_storage import QueueSettings, is_shared

    if is_shared(storage):
        if rerun:
            _fail("--rerun cannot be used with a shared --storage queue: every worker would redo the suite; run it "
                  "once without --storage (or on a fresh --storage database)")
        if grace_s < heartbeat_s:
            _fail(f"--grace-period {grace_s} is shorter than --heartbeat {heartbeat_s}: every run would look dead; "
                  f"use a grace period of a few heartbeats")
        queue = QueueSettings(storage, heartbeat_interval=heartbeat_s, grace_period=grace_s)
    _check_checkpoints(checkpoints)
    try:
        _run(suite, overrides, tracking_uri, data_dir, reports_dir, rerun, device, quiet, no_report, no_search, storage,
             queue, checkpoints, checkpoint_every)
    except KeyboardInterrupt:  # before any run was started, or while writing the report
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _check_checkpoints(where: str) -> None:
    """``--checkpoints``: local, mlflow, or a directory that exists or can be made."""
    from pathlib import Path

    from cnnbench.checkpoint_store import LOCAL, MLFLOW

    if where in (LOCAL, MLFLOW):
        return
    path = Path(where).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"--checkpoints {where}: not a directory cnnbench can write ({e.strerror}); give local, mlflow, or a "
              f"directory every worker can write")


def _run(suite, overrides, tracking_uri, data_dir, reports_dir, rerun, device, quiet, no_report, no_search, storage,
         queue, checkpoints="local", checkpoint_every=None):
    spec = _load(suite, overrides)
    if queue is not None and spec.adaptive:
        _fail(f"{suite}: adaptive seeds (seeds: {{min, max}}) need one process to read the verdicts between rounds, "
              "and a shared --storage queue has many; give the suite a seed count (e.g. --set seeds="
              f"{spec.seeds.max}) or run it without a shared queue")
    if queue is not None and spec.architecture_search is not None:
        _fail(f"{suite}: architecture_search runs in one process (its front decides which variants the queue would "
              "hold); run the suite without a shared --storage queue")
    from cnnbench import devices
    from cnnbench.checkpoint_store import CHECKPOINT_EVERY_S
    from cnnbench.data import DataNotFoundError
    from cnnbench.interrupts import Interrupted, clear_interrupt, interrupt_requested, request_interrupt
    from cnnbench.optuna_storage import StorageUnavailable
    from cnnbench.runner import preload_data, run_suite

    if device is not None:
        import re

        from cnnbench.config import DEVICE_PATTERN

        if not re.match(DEVICE_PATTERN, device) or device == "auto":
            _fail(f"--device '{device}' is not a device; use cpu, cuda, cuda:N, mps or xla")
        try:
            devices.resolve(device)
        except devices.DeviceUnavailable as e:
            _fail(f"--device {device}: {e}")
    try:
        preload_data(spec, data_dir)
    except DataNotFoundError as e:
        _fail(str(e))
    from cnnbench.sqlite_store import StoreBusy, exclusive_sqlite
    from cnnbench.tracking import TrackingLost, TrackingRefused, resolve_uri

    store_lock = contextlib.ExitStack()  # released when the runs are done (or at exit, on any error)
    try:  # before the store is opened: two processes must not both create a fresh SQLite store
        store_lock.enter_context(exclusive_sqlite(resolve_uri(tracking_uri)))
    except StoreBusy as e:
        _fail(str(e))
    tracker = _tracker(tracking_uri)

    def on_signal(signum, frame):
        code = 143 if signum == signal.SIGTERM else 130
        if interrupt_requested():  # a second Ctrl-C: stop now, wherever we are
            raise Interrupted(code)
        request_interrupt(code)  # acted on at the next batch

    clear_interrupt()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    from cnnbench.progress import RichEvents

    events = RichEvents(quiet=quiet)
    try:
        with store_lock, events:
            common = dict(data_dir=data_dir, device=device, events=events, search=not no_search,
                          command=_reproduce_command(suite, overrides, device, no_search), checkpoints=checkpoints,
                          checkpoint_every=CHECKPOINT_EVERY_S if checkpoint_every is None else checkpoint_every)
            if queue is not None:  # one of possibly many workers sharing the suite's runs through an RDB storage
                from cnnbench.worker import run_worker

                outcome = run_worker(spec, tracker, queue, **common)
            else:
                outcome = run_suite(spec, tracker, rerun=rerun, storage=storage, **common)
    except StorageUnavailable as e:
        _fail(f"{e}\n(--storage takes postgresql://user@host/db, sqlite:///path.db or a journal file path)")
    except Interrupted as e:
        click.echo(f"interrupted: runs in flight were recorded as KILLED in MLflow ({tracker.uri}); "
                   f"run the same command again to continue.", err=True)
        sys.exit(e.exit_code)
    except TrackingRefused as e:  # 401/403: nothing is wrong with the store, only with who asks
        _fail(f"{e}.\nRuns already recorded stay recorded; a run in flight, if any, was not"
              f"{' and went back to the queue' if queue else ''}. Run the same command again once the credentials "
              f"or the permission are fixed.", EXIT_TRACKING_LOST)
    except TrackingLost as e:
        _fail(f"{e}.\nNothing was lost silently: the run in flight was not recorded and keeps its checkpoint"
              f"{' and went back to the queue' if queue else ''}; start the tracking server again and run the same "
              f"command to redo it.", EXIT_TRACKING_LOST)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupt_requested():  # the signal came after the last run's last batch: honour it, skip the report
        click.echo("interrupted after the last run finished; no report written", err=True)
        sys.exit(interrupt_requested())
    counts = ", ".join(f"{n} {s}" for s, n in sorted(outcome.counts.items())) or "nothing to run"
    click.echo(f"{spec.name}: {counts}; {outcome.reused} reused from earlier runs; "
               f"{outcome.wall_s:.1f} s ({outcome.mlflow_s:.2f} s in MLflow); tracking {tracker.uri}")
    if not no_report:
        from cnnbench.report import build_report

        _publish(tracker, spec, build_report(spec, tracker, reports_dir), outcome.parent_run_id, tracking_uri)
    sys.exit(outcome.exit_code)


def _publish(tracker, spec, path, parent: str | None, tracking_uri: str | None) -> None:
    """Put the report beside the runs (the experiment's description, the suite run's artifacts) and say
    where to read it: the file, and the MLflow UI on the experiment."""
    from cnnbench.report import META_PREFIX, report_files, report_meta
    from cnnbench.tracking import experiment_note

    exp_id = tracker.experiment_id(spec.name)
    meta = report_meta(path) or {}
    files = {f.name: f.read_bytes() for f in report_files(path)}
    text = files[path.name].decode()  # MLflow's viewer shows HTML comments as text: the metadata line is left out
    files[path.name] = (text.split("\n", 1)[1] if text.startswith(META_PREFIX) else text).encode()
    in_mlflow = f"suite run {parent}: report/" if parent is not None else "no suite run to attach it to"
    tracker.publish_report(exp_id, parent, experiment_note(spec.question, meta.get("answer", "–"),
                                                           f"Full report: `{path}` (MLflow: {in_mlflow})."), files)
    from cnnbench import redact

    ui = "cnnbench ui" + (f" --tracking-uri {redact.text(tracking_uri)}" if tracking_uri else "")
    click.echo(f"report: {path} (also in MLflow, {in_mlflow})")
    click.echo(f"browse: {ui}  → http://127.0.0.1:5000/#/experiments/{exp_id}/runs?{UI_VIEW}")


def _reproduce_command(suite: str, overrides: tuple[str, ...], device: str | None, no_search: bool = False) -> str:
    """The command that reproduces these runs (store, data and report locations are left out)."""
    import shlex

    args = ["cnnbench", "run", suite]
    for o in overrides:
        args += ["--set", o]
    if device:
        args += ["--device", device]
    if no_search:
        args.append("--no-search")
    return shlex.join(args)


@main.command()
@click.argument("suite", type=click.Path())
@set_option
@uri_option
@click.option("--pilot", type=click.IntRange(2, 50), default=None,
              help="first run this many seeds of every variant (reused later by the full suite) to plan from their spread")
@data_dir_option
def validate(suite, overrides, tracking_uri, pilot, data_dir):
    """Check SUITE and print the plan (runs, epochs, rough time) and the seeds its margin needs: from the spread
    of paired differences already recorded in the tracking store, or from a pilot run (--pilot N)."""
    spec = _load(suite, overrides)
    from cnnbench.plan_summary import describe_plan
    from cnnbench.sqlite_store import exclusive_sqlite, sqlite_path
    from cnnbench.tracking import resolve_uri

    click.echo(describe_plan(spec))
    uri = resolve_uri(tracking_uri)
    if pilot is not None:
        pilot_spec = _load(suite, (*overrides, f"seeds={pilot}"))
        from cnnbench.runner import preload_data, run_suite

        click.echo(f"pilot: {pilot} seeds of every variant, recorded in {uri}")
        from cnnbench.data import DataNotFoundError

        try:
            preload_data(pilot_spec, data_dir)
        except DataNotFoundError as e:
            _fail(str(e))
        with exclusive_sqlite(uri):
            run_suite(pilot_spec, _tracker(uri), data_dir=data_dir, search=False,
                      command=f"cnnbench validate {suite} --pilot {pilot}")
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        click.echo(f"No tracking store at {uri} yet: run a pilot (--pilot 3) to plan the seeds from measured spread.")
        return
    from cnnbench.report.planning import seed_plan

    click.echo("\n".join(seed_plan(spec, _tracker(uri).runs_frame(spec.name))))


@main.command()
@click.argument("suite", type=click.Path())
@set_option
@uri_option
@reports_option
def report(suite, overrides, tracking_uri, reports_dir):
    """Re-render reports/<name>.md for SUITE from MLflow alone (no training)."""
    spec = _load(suite, overrides, check_names=False)
    tracker = _tracker(tracking_uri)
    if tracker.experiment_id(spec.name, create=False) is None:
        _fail(f"no MLflow experiment '{spec.name}' at {tracker.uri}; run the suite first (cnnbench run {suite})")
    from cnnbench.report import build_report
    from cnnbench.tracking import ROLE_SUITE

    path = build_report(spec, tracker, reports_dir)
    runs = tracker.search(tracker.experiment_id(spec.name), f"tags.`cnnbench.role` = '{ROLE_SUITE}'")
    newest = max(runs, key=lambda r: r.info.start_time).info.run_id if runs else None
    _publish(tracker, spec, path, newest, tracking_uri)


@main.command(name="list")
@click.argument("kind", required=False)
def list_(kind):
    """List what is registered (datasets, models, optimizers, …, techniques), per kind."""
    from cnnbench import techniques
    from cnnbench.registries import all_registries
    from cnnbench.registry import did_you_mean

    regs = all_registries()
    kinds = [*regs, "technique"]
    if kind is not None:
        key = kind.rstrip("s") if kind.rstrip("s") in kinds else kind
        if key not in kinds:
            _fail(f"unknown kind '{kind}';{did_you_mean(kind, kinds)} kinds: {', '.join(kinds)}")
        kinds = [key]
    for name in kinds:
        click.echo(f"{name}s:")
        if name == "technique":  # name, stage, where its settings live, what it does
            for t in sorted(techniques.registered().values(), key=lambda t: (t.stage, t.order, t.name)):
                key = f"{t.name}:" if t.block is not None else "train:"
                click.echo(f"  {t.name:<22} {t.stage.replace('_', '-')} ({key}) {t.summary}")
            continue
        reg = regs[name]
        for entry in reg.names():
            click.echo(f"  {entry:<22} {reg.info(entry)['doc']}")
        if reg.fallback_hint:
            click.echo(f"  {'…':<22} {reg.fallback_hint.removeprefix('(').removesuffix(')')}")


@main.command()
@uri_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def ui(tracking_uri, host, port):
    """Start the MLflow UI over the same store `run` writes to."""
    import os
    import shutil

    from cnnbench.tracking import resolve_uri

    uri = resolve_uri(tracking_uri)
    exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    from cnnbench import redact

    click.echo(f"MLflow UI for {redact.text(uri)} at http://{host}:{port}/#/experiments?{UI_VIEW}  (Ctrl-C to stop)")
    # the store through MLflow's environment variable, not argv: a password in it stays out of `ps`
    os.execve(exe, [exe, "ui", "--host", host, "--port", str(port)], {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri})


@main.command()
def schema():
    """Print the suite's JSON schema (for editors and linters)."""
    import json

    from cnnbench.config import json_schema

    click.echo(json.dumps(json_schema(), indent=2))
