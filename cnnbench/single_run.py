"""One (variant, seed): train it and record it in MLflow as a child of the suite's run.

Failure is a result: a diverged run is recorded as ``diverged``, a missing device as ``skipped``
with the reason, an exception as ``failed`` with its traceback — and the suite goes on.
Ctrl-C / SIGTERM end the run in flight as KILLED (its metrics flushed first) and propagate.
"""

from __future__ import annotations

import traceback

import yaml

from cnnbench.checkpoint_store import CheckpointStore
from cnnbench.checkpoints import CheckpointError
from cnnbench.config import RunSpec, flatten, source_of
from cnnbench.events import Events
from cnnbench.interrupts import Interrupted, interruptible, raise_if_interrupted
from cnnbench.tracking import ROLE_RUN, BufferedRun, Tracker, TrackingLost, worker_id


def run_one(spec: RunSpec, tracker: Tracker, exp_id: str, parent: str, env: dict, data_dir, device_override,
            events: Events, upstream=None, checkpoints: CheckpointStore | None = None,
            started=None, side=None, abandoned: set[str] | None = None) -> tuple[str, dict, str]:
    """Train one (variant, seed) and record it; returns (status, final metrics, message).
    ``started(run_id)`` is called once its MLflow run exists (a shared queue notes it on the trial);
    ``side`` (:class:`cnnbench.sidebyside.SideBySide`) keeps the trained model for the timing protocol.
    The machine's load average and CPU steal over the run are recorded with it.

    Training state is checkpointed per epoch in ``checkpoints`` (:class:`CheckpointStore`): kept when the
    run is interrupted (the next ``run``, on this machine or — travelling — another, continues from it),
    removed once the run has an outcome.

    ``abandoned``: fingerprints of the suite's runs left RUNNING by a process that died, looked up once per
    suite by a single process (None, on a shared queue: look this run's up as it starts)."""
    from cnnbench import data as datamod
    from cnnbench import devices, techniques
    from cnnbench.deployment import measure_deployed
    from cnnbench.distributed import train_distributed
    from cnnbench.posttraining import run_post_training
    from cnnbench.timing import LoadMonitor
    from cnnbench.train import check_supported, train
    from cnnbench.upstream import Missing

    exp = spec.experiment
    tags = {
        "cnnbench.suite": spec.suite,
        "cnnbench.role": ROLE_RUN,
        "cnnbench.variant": spec.variant,
        "cnnbench.seed": str(spec.seed),
        "cnnbench.baseline": str(spec.is_baseline).lower(),
        "cnnbench.fingerprint": spec.fingerprint,
        "cnnbench.plan_key": spec.plan_key,
        "cnnbench.status": "running",
        "cnnbench.worker": worker_id(),
    }
    if spec.study:
        tags |= {"cnnbench.study": spec.study, "cnnbench.tuned": "true"}
    config_yaml = yaml.safe_dump({"seed": spec.seed, **exp.model_dump(mode="json")}, sort_keys=False)
    skip = spec.skip_reason
    if skip is None:
        try:
            device = devices.resolve(device_override or exp.device)
            check_supported(exp, device)  # e.g. a precision the device cannot do
        except devices.DeviceUnavailable as e:
            skip = str(e)
    if skip is not None:  # not trained: recorded as skipped with the reason
        run_id = tracker.start_run(exp_id, spec.run_name, tags | {"cnnbench.device": exp.device}, parent)
        tracker.log(run_id, params=flatten(exp.model_dump(mode="json")) | {"seed": spec.seed},
                    tags={"cnnbench.status": "skipped", "cnnbench.reason": skip})
        tracker.end_run(run_id, "FINISHED")
        return "skipped", {}, skip

    if abandoned is None or spec.fingerprint in abandoned:
        tracker.end_abandoned(exp_id, spec.fingerprint, "its process stopped before ending it (killed, or the "
                                                         "tracking server stopped answering); the run was started again")
    run_id = tracker.start_run(exp_id, spec.run_name, tags | {"cnnbench.device": device.type}, parent)
    if started is not None:
        started(run_id)
    buffered = BufferedRun(tracker, run_id, params=flatten(exp.model_dump(mode="json")) | {"seed": spec.seed})
    run_env = env | devices.describe(device)

    def on_epoch(record: dict) -> None:
        buffered.log_epoch(record)
        events.epoch(spec, record)
        raise_if_interrupted()

    monitor = LoadMonitor().start()  # the machine's load over the run, recorded with it
    try:
        split = datamod.split(datamod.load(exp.data, data_dir), exp.data.val_fraction, exp.data.limit_train)
        weights, models = upstream.weights(spec) if upstream is not None else ({}, {})  # sources, teachers
        if exp.compresses:  # quantize / prune / factorize the source's trained weights
            result = run_post_training(exp, spec.seed, split, device, weights[source_of(upstream.suite, spec.variant)],
                                       on_epoch, interruptible(events.batch))
        else:
            context = techniques.TrainingContext(weights, models, split.data, device)
            losses = [f for t in techniques.active(exp, "training") if (f := t.loss(exp, context)) is not None]
            ckpt = None
            if checkpoints is not None:
                ckpt, resumed = checkpoints.open(spec.fingerprint, run_id)
                if resumed:
                    tracker.log(run_id, tags=resumed)
            if exp.train.processes > 1:  # one run over N processes (no mid-run checkpoint: it restarts whole)
                result = train_distributed(exp, spec.seed, split, device, on_epoch=on_epoch,
                                           on_batch=interruptible(events.batch))
            else:
                result = train(exp, spec.seed, split, device, on_epoch=on_epoch, on_batch=interruptible(events.batch),
                               loss_fn=losses[0] if losses else None, checkpoint=ckpt)
            if ckpt is not None and ckpt.on_saved is not None:  # what travelling checkpoints cost this run
                result.metrics["checkpoint_upload_s"] = ckpt.on_saved.seconds
        measure_deployed(result, exp, split, device)  # test a compressed model; inference metrics of every run
        if upstream is not None and result.status == "finished":
            upstream.save(spec.variant, spec.seed, run_id, result.model)
    except (KeyboardInterrupt, Interrupted):
        buffered.flush(tags={"cnnbench.status": "killed"})
        tracker.end_run(run_id, "KILLED")
        raise
    except TrackingLost:  # fail loudly: the checkpoint stays, the next `run` redoes what was not recorded
        raise
    except Missing as e:  # its source or teacher did not finish
        buffered.flush(tags={"cnnbench.status": "skipped", "cnnbench.reason": str(e)})
        tracker.end_run(run_id, "FINISHED")
        return "skipped", {}, str(e)
    except Exception as e:  # noqa: BLE001 - any error in a run is recorded, and the suite goes on
        if checkpoints is not None and not isinstance(e, CheckpointError):  # a refused one stays for the user
            checkpoints.discard(spec.fingerprint, run_id)
        message = f"{type(e).__name__}: {e}"
        buffered.flush(tags={"cnnbench.status": "failed", "cnnbench.reason": message[:5000]})
        tracker.log_artifacts(run_id, {"traceback.txt": traceback.format_exc(), "config.yaml": config_yaml,
                                       "environment.json": run_env})
        tracker.end_run(run_id, "FAILED")
        return "failed", {}, message

    load = monitor.stop()
    result.metrics |= load.metrics()
    tags = {"cnnbench.status": result.status} | result.tags
    if load.loaded:
        tags["cnnbench.loaded"] = "true"
    if result.message:
        tags["cnnbench.reason"] = result.message
    buffered.flush(metrics=result.metrics, tags=tags, step=len(result.history))
    artifacts = {"config.yaml": config_yaml, "environment.json": run_env} | result.artifacts
    if result.confusion is not None:
        artifacts["confusion_matrix.json"] = result.confusion
    tracker.log_artifacts(run_id, artifacts)
    tracker.end_run(run_id, "FINISHED")
    if checkpoints is not None:  # only once the result is recorded: a lost tracking server leaves it for the redo
        checkpoints.finished(spec.fingerprint)
    if side is not None:
        side.keep(spec, run_id, result, device, tuple(split.data.shape))
    return result.status, result.metrics, result.message
