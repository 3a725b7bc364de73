"""Checkpoints: state dicts written atomically and read with ``weights_only=True`` only.

A checkpoint that needs pickled Python objects to load is refused — there is no fallback to
``weights_only=False``, which would run arbitrary code from the file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, not a state dict, or carrying pickled objects."""


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state_dict`` (tensors moved to the CPU) to ``path`` atomically (see :func:`save_atomic`)."""
    return save_atomic({k: v.detach().cpu() for k, v in state_dict.items()}, path)


def save_atomic(state, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, flushed to disk, then renamed over ``path``:
    a reader (or a resumed run after a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``{"state_dict": …}`` is unwrapped), loaded with ``weights_only=True``."""
    path = Path(path)
    state = load_safely(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def load_safely(path: Path):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and dicts, nothing else."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects, not only tensors, and is loaded with "
            f"weights_only=True only ({first}). Save model.state_dict() instead of the model.") from None
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from None
    return state


# ───────────────────────────── resuming a training run ─────────────────────────────

TRAINING_STATE_VERSION = 2  # 2: the state names the run that saved it ("owner")
TRAINING_STATE_KEYS = {"version", "owner", "epoch", "model", "optimizer", "scheduler", "scaler", "rng", "loop"}


@dataclass
class TrainingCheckpoint:
    """Where one run keeps its per-epoch training state. ``owner`` (the run's fingerprint) is saved in the
    state and checked when it is loaded: a state saved by another run is refused. ``on_saved(path, epoch)``
    is called after each save (checkpoints that travel upload it: :mod:`cnnbench.checkpoint_store`).
    ``every_s``: an epoch's state is saved only when at least this many seconds have passed since the
    run started or last saved (0: after every epoch) — a run killed mid-way redoes at most that much
    training, and a run of a few seconds, cheaper to redo than to save, writes nothing."""

    path: Path
    owner: str = ""
    on_saved: Callable[[Path, int], None] | None = None
    every_s: float = 0.0


def save_training_state(path: str | Path, owner: str = "", **state) -> Path:
    """Everything a run needs to continue after its last finished epoch exactly as if it had not
    stopped: model, optimizer, scheduler, GradScaler, every RNG, the loop's counters and history;
    ``owner`` names the run (:class:`TrainingCheckpoint`)."""
    return save_atomic({"version": TRAINING_STATE_VERSION, "owner": owner, **state}, path)


def load_training_state(path: str | Path, owner: str | None = None) -> dict:
    """The state saved by :func:`save_training_state`, loaded with ``weights_only=True``; a truncated
    file, pickled objects, another layout or (``owner`` given) another run's state are refused with the
    path and the way out."""
    path = Path(path)
    try:
        state = load_safely(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; delete it to start this run from scratch") from None
    if not isinstance(state, dict) or set(state) != TRAINING_STATE_KEYS or state["version"] != TRAINING_STATE_VERSION:
        raise CheckpointError(f"{path}: not a cnnbench training checkpoint (version {TRAINING_STATE_VERSION}); "
                              "delete it to start this run from scratch")
    if owner is not None and state["owner"] != owner:
        raise CheckpointError(f"{path}: refused: it was saved by run {state['owner'] or '(unnamed)'}, not by this one "
                              f"({owner or '(unnamed)'}); delete it to start this run from scratch")
    return state
