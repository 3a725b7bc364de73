"""Where a run keeps its per-epoch training state, and how that state travels to another machine.

``--checkpoints`` (``$CNNBENCH_CHECKPOINTS``) chooses:

- ``local`` (default): ``checkpoints/<suite>/<fingerprint>.pt`` beside a SQLite store, else in the worker's
  current directory. Free, and enough on one machine.
- a directory: the same layout under it — a shared filesystem every worker mounts.
- ``mlflow``: the local file, plus a copy uploaded after every save into the run's own MLflow artifacts
  (``checkpoint/state-<epoch % 2>.pt``: two slots, so a worker killed mid-upload leaves the previous epoch's
  copy whole) and, after the upload, its slot, epoch and SHA-256 as run tags. A run that starts again on any
  machine (re-queued from a dead worker) finds the newest copy among the earlier attempts of the same
  (variant, seed), refuses it unless its SHA-256 matches the tag and it names the same run, and continues
  from it; once the run is recorded, the copies are deleted.

Loading is :func:`cnnbench.checkpoints.load_training_state` in every case: ``weights_only=True`` only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from cnnbench.checkpoints import CheckpointError, TrainingCheckpoint
from cnnbench.sqlite_store import sqlite_path
from cnnbench.tracking import Tracker

# A run saves its state after an epoch once this many seconds have passed since its start or last save:
# a killed run redoes at most that much (plus an epoch); a run shorter than this (the quickstart's take
# half a second) writes no state at all — each save is a torch.save and an fsync, a few ms per epoch.
CHECKPOINT_EVERY_S = 10.0

LOCAL, MLFLOW = "local", "mlflow"
ARTIFACT_DIR = "checkpoint"
TAG_SLOT, TAG_EPOCH, TAG_SHA256 = "cnnbench.checkpoint.slot", "cnnbench.checkpoint.epoch", "cnnbench.checkpoint.sha256"
TAGS = (TAG_SLOT, TAG_EPOCH, TAG_SHA256)


def local_root(tracking_uri: str, where: str = LOCAL) -> Path:
    """The directory of the local copies: ``where`` when it is a path, else ``checkpoints/`` beside a SQLite
    store, else in the current directory (a worker's own disk when the store is a server or a database)."""
    if where not in (LOCAL, MLFLOW):
        return Path(where).expanduser().resolve()
    db = sqlite_path(tracking_uri)
    return db.parent / "checkpoints" if db is not None else Path("checkpoints").resolve()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    """The training checkpoints of one suite's runs (see the module docstring for ``where``)."""

    def __init__(self, where: str, tracker: Tracker, suite_name: str, experiment_id: str,
                 every_s: float = CHECKPOINT_EVERY_S):
        self.travels, self.every_s = where == MLFLOW, every_s
        self.tracker, self.experiment_id = tracker, experiment_id
        self.dir = local_root(tracker.uri, where) / suite_name

    def local(self, fingerprint: str) -> Path:
        return self.dir / f"{fingerprint}.pt"

    def open(self, fingerprint: str, run_id: str) -> tuple[TrainingCheckpoint, dict]:
        """The run's checkpoint — the local file, else (``mlflow``) the newest travelled copy, downloaded and
        checked — and the metrics/tags saying where it came from and (later) what uploads cost."""
        path, tags = self.local(fingerprint), {}
        if path.exists():
            tags["cnnbench.resumed_from"] = str(path)
        elif self.travels and (found := self._newest_copy(fingerprint, run_id)) is not None:
            source, slot, epoch, digest = found
            self._download(source, slot, digest, path)
            tags["cnnbench.resumed_from"] = f"runs:/{source}/{slot} (epoch {epoch})"
        upload = _Uploads(self.tracker, run_id) if self.travels else None
        return TrainingCheckpoint(path, owner=fingerprint, on_saved=upload, every_s=self.every_s), tags

    def finished(self, fingerprint: str) -> None:
        """The run's result is recorded: its local file and every travelled copy of it go."""
        self.local(fingerprint).unlink(missing_ok=True)
        if self.travels:
            for run in self.tracker.runs_of(self.experiment_id, fingerprint):  # this attempt and earlier ones
                if TAG_SHA256 in run.data.tags:  # it uploaded a state (a run of one epoch never does)
                    self.tracker.delete_tags(run.info.run_id, [t for t in TAGS if t in run.data.tags])
                    self.tracker.delete_artifacts(run.info.run_id, ARTIFACT_DIR)

    def discard(self, fingerprint: str, run_id: str) -> None:
        """The run failed: the next attempt starts from scratch, not from the state that led here."""
        self.local(fingerprint).unlink(missing_ok=True)
        if self.travels:
            tags = self.tracker.run_tags(run_id)
            self.tracker.delete_tags(run_id, [t for t in TAGS if t in tags])

    # ── travelled copies ─────────────────────────────────────────────────────

    def _newest_copy(self, fingerprint: str, run_id: str) -> tuple[str, str, int, str] | None:
        """(run id, artifact path, epoch, SHA-256) of the newest uploaded state among earlier attempts."""
        copies = [(int(r.data.tags[TAG_EPOCH]), r.info.start_time, r.info.run_id, r.data.tags[TAG_SLOT],
                   r.data.tags[TAG_SHA256])
                  for r in self.tracker.runs_of(self.experiment_id, fingerprint)
                  if r.info.run_id != run_id and all(t in r.data.tags for t in TAGS)]
        if not copies:
            return None
        epoch, _, source, slot, digest = max(copies)
        return source, slot, epoch, digest

    def _download(self, source: str, slot: str, digest: str, path: Path) -> None:
        """Download ``slot`` of run ``source`` to ``path`` — only if its SHA-256 is the one recorded with it."""
        with tempfile.TemporaryDirectory(dir=_existing(path.parent)) as tmp:
            got = Path(self.tracker.download_artifact(source, slot, tmp))
            if sha256(got) != digest:
                raise CheckpointError(
                    f"runs:/{source}/{slot}: refused: its SHA-256 is not the one recorded when it was uploaded "
                    f"(tag {TAG_SHA256}): the file was changed or only partly written. Delete that run "
                    f"(mlflow runs delete --run-id {source}) to start this run from scratch")
            os.replace(got, path)


class _Uploads:
    """``on_saved``: after each epoch's save, upload the state into the run's artifacts, then tag it."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id, self.seconds = tracker, run_id, 0.0

    def __call__(self, path: Path, epoch: int) -> None:
        t0 = time.perf_counter()
        slot = f"state-{epoch % 2}.pt"
        digest = sha256(path)
        with tempfile.TemporaryDirectory() as tmp:  # uploaded under its slot's name
            copy = Path(tmp) / slot
            shutil.copyfile(path, copy)
            self.tracker.log_file(self.run_id, copy, ARTIFACT_DIR)
        self.tracker.log(self.run_id, tags={TAG_SLOT: f"{ARTIFACT_DIR}/{slot}", TAG_EPOCH: str(epoch),
                                            TAG_SHA256: digest})
        self.seconds += time.perf_counter() - t0


def _existing(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
