"""Latency measurement for shared, noisy machines: interleaved rounds with an A/A control, and the
machine's load over the measurement.

Timing each model on its own (``measure.latency_ms``) compares numbers taken minutes apart: if the
machine got busier in between (another job, a neighbour on the hypervisor, thermal throttling), that
shows up as a difference between the models. Here the models of one seed are timed side by side in
one process, in short interleaved rounds, so slow drifts in the machine hit every model about
equally; each round gives one value per model, and the statistics over rounds are done elsewhere.

This module only measures; it decides nothing.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

STEAL_LIMIT = 0.05  # above this share of CPU time taken by the hypervisor, timings are not trustworthy
LOAD_SLACK = 1.0  # a load average above CPUs + this means another job competes with the one measured

_PROC_LOADAVG = "/proc/loadavg"
_PROC_STAT = "/proc/stat"


# ───────────────────────── interleaved latency ─────────────────────────


def _check_arguments(models, batch_sizes, rounds, calls_per_round, warmup) -> None:
    if not models:
        raise ValueError("models must name at least one model (got an empty mapping)")
    if not batch_sizes:
        raise ValueError("batch_sizes must hold at least one batch size (got an empty tuple)")
    if any(int(bs) != bs or bs < 1 for bs in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers (got {tuple(batch_sizes)})")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(f"batch_sizes must not repeat (got {tuple(batch_sizes)})")
    if rounds < 2:
        raise ValueError(f"rounds must be at least 2, to give a spread over rounds (got {rounds})")
    if calls_per_round < 1:
        raise ValueError(f"calls_per_round must be at least 1 (got {calls_per_round})")
    if warmup < 0:
        raise ValueError(f"warmup must not be negative (got {warmup})")


def _fixed_inputs(input_shape: tuple[int, ...], batch_sizes: tuple[int, ...], device: torch.device,
                  seed: int) -> dict[int, torch.Tensor]:
    """One input per batch size, the same for every model: drawn on the CPU from its own generator
    seeded with ``seed`` (so a batch size's input does not depend on which others are asked for),
    then moved to ``device``."""
    inputs = {}
    for bs in batch_sizes:
        gen = torch.Generator().manual_seed(seed)
        inputs[bs] = torch.randn(bs, *input_shape, generator=gen).to(device)
    return inputs


def interleaved_latency(models: dict[str, Callable], input_shape: tuple[int, ...], device: torch.device,
                        batch_sizes: tuple[int, ...] = (1, 64), rounds: int = 15, calls_per_round: int = 10,
                        warmup: int = 5, seed: int = 0) -> dict[str, dict[int, list[float]]]:
    """name -> batch size -> one value per round: the median wall time (ms) of ``calls_per_round``
    forward passes of that model on that batch size in that round.

    ``models`` are callables taking one batch (``nn.Module``, ``torch.compile``'d modules, exported
    PT2E graphs); they are only called, never changed — put them in eval mode before. The protocol:

    * **One process, one fixed input per batch size** shared by every model (see :func:`_fixed_inputs`),
      so the models differ only in themselves.
    * **Warm-up**: every model gets ``warmup`` untimed calls at every batch size before any round
      (compilation, lazy initialisation, allocator and cache warm-up).
    * **Interleaving**: each round makes, for each batch size, ``calls_per_round`` passes over the models,
      one call of each in turn (A, B, C, A′, A, B, C, A′, …). A change in the machine (another job
      starting, throttling) then lands on all models within a round instead of on whichever model
      happened to be measured at that time: on a shared 2-core VM the latency of one model at batch 1
      moves by 3× between rounds a second apart, so calls of a model must not be grouped.
    * **Rotation**: round ``r`` starts with model ``r % len(models)`` and goes on in order, wrapping
      around; so no model always runs first (after the previous batch size's heaviest model, or
      with the caches and clocks of an idle moment) or always last.
    * **A/A control**: the caller enters the baseline twice under two names. Both copies go through
      exactly the same protocol, so the spread between them is the machine's noise floor: a
      difference between variants no larger than that is not evidence of anything.

    Each call is timed on its own between two device synchronizations (``devices.synchronize``), so
    asynchronous devices are timed to completion; everything runs under ``torch.no_grad()``.
    """
    from cnnbench import devices

    batch_sizes = tuple(batch_sizes)
    _check_arguments(models, batch_sizes, rounds, calls_per_round, warmup)
    names = list(models)
    inputs = _fixed_inputs(tuple(input_shape), batch_sizes, device, seed)
    out: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in batch_sizes} for name in names}

    with torch.no_grad():
        for bs in batch_sizes:
            for name in names:
                for _ in range(warmup):
                    models[name](inputs[bs])
        devices.synchronize(device)

        for r in range(rounds):
            start = r % len(names)
            order = names[start:] + names[:start]
            for bs in batch_sizes:
                x = inputs[bs]
                calls: dict[str, list[float]] = {name: [] for name in order}
                for _ in range(calls_per_round):  # one call of each model in turn: A, B, C, A', A, B, C, A', …
                    for name in order:
                        devices.synchronize(device)
                        t0 = time.perf_counter()
                        models[name](x)
                        devices.synchronize(device)
                        calls[name].append((time.perf_counter() - t0) * 1e3)
                for name in order:
                    out[name][bs].append(statistics.median(calls[name]))
    return out


# ───────────────────────── machine load ─────────────────────────


@dataclass
class MachineLoad:
    """How busy the machine was over an interval (see :class:`LoadMonitor`)."""

    load_avg_1m: float  # the larger 1-minute load average of the start and the end (nan off Linux)
    cpu_steal_fraction: float  # share of CPU time stolen by the hypervisor over the interval, /proc/stat (nan off Linux)
    cpus: int

    @property
    def loaded(self) -> bool:
        """Something else competes for the CPUs: a load average above CPUs + ``LOAD_SLACK`` (the measured
        process itself keeps up to one runnable task per CPU busy: a 2-thread run on 2 cores alone reads ≈ 2),
        or more than ``STEAL_LIMIT`` of the CPU time taken by the hypervisor. False where a figure is unknown."""
        return bool(self.load_avg_1m > self.cpus + LOAD_SLACK or self.cpu_steal_fraction > STEAL_LIMIT)

    def metrics(self) -> dict[str, float]:
        return {"load_avg_1m": self.load_avg_1m, "cpu_steal_fraction": self.cpu_steal_fraction}


def _load_avg_1m() -> float:
    try:
        with open(_PROC_LOADAVG) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


def _cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of the aggregate ``cpu`` line of /proc/stat; None where unreadable.

    The total is user + nice + system + idle + iowait + irq + softirq + steal: the later fields
    (guest, guest_nice) are already counted inside user and nice (proc(5)), so adding them would
    count that time twice."""
    try:
        with open(_PROC_STAT) as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == "cpu":
                    values = [int(v) for v in fields[1:9]]
                    steal = values[7] if len(values) > 7 else 0  # kernels before 2.6.11 have no steal field
                    return steal, sum(values)
    except (OSError, ValueError):
        pass
    return None


class LoadMonitor:
    """Context manager: ``with LoadMonitor() as mon: ...`` then ``mon.result`` is a :class:`MachineLoad`
    for that interval (None until the block has ended). Reads /proc/loadavg and /proc/stat at the start
    and at the end; where they are missing the figures are nan. Never raises, and needs no torch."""

    def __init__(self) -> None:
        self.result: MachineLoad | None = None
        self._load_start = math.nan
        self._times_start: tuple[int, int] | None = None

    def start(self) -> LoadMonitor:
        return self.__enter__()

    def stop(self) -> MachineLoad:
        self.__exit__(None, None, None)
        return self.result

    def __enter__(self) -> LoadMonitor:
        self.result = None
        self._load_start = _load_avg_1m()
        self._times_start = _cpu_times()
        return self

    def __exit__(self, *exc) -> bool:
        load_end = _load_avg_1m()
        times_end = _cpu_times()
        load = max(self._load_start, load_end) if not math.isnan(self._load_start + load_end) else math.nan
        steal = math.nan
        if self._times_start is not None and times_end is not None:
            d_steal = times_end[0] - self._times_start[0]
            d_total = times_end[1] - self._times_start[1]
            # clamped: iowait on the aggregate line may go backwards (proc(5)), so a tiny total could overshoot
            steal = min(1.0, max(0.0, d_steal / d_total)) if d_total > 0 else 0.0
        self.result = MachineLoad(load_avg_1m=load, cpu_steal_fraction=steal, cpus=os.cpu_count() or 1)
        return False
