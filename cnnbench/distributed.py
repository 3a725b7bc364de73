"""Data-parallel training of one run: ``train.processes: N`` starts N processes that train the same model
with ``torch.nn.parallel.DistributedDataParallel`` (gloo on the CPU, nccl on CUDA, one GPU per process).

Every process starts from the seed's weights and walks the same data order; each takes 1/N of every
batch (the batch is augmented whole first, as one process would) and DDP averages the gradients, so the
global batch stays ``data.batch_size`` and the learning rate needs no scaling. Batch norm normalizes
each process's share (no SyncBatchNorm: it has no CPU kernels). Rank 0 reports: its per-epoch records
reach the caller's ``on_epoch`` as they happen, and its final model and metrics are the run's. A run of
N processes has no mid-run checkpoint (a killed one starts again), and is not bit-identical to one
process: dropout masks and float reductions are drawn and summed per process.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import tempfile
from pathlib import Path

import torch

from cnnbench.config import Experiment
from cnnbench.data import Split
from cnnbench.train import RunResult, check_supported, initial_model, train


def threads_per_process(exp: Experiment) -> int:
    """``train.threads``, or the CPU's cores shared evenly between the processes."""
    return exp.train.threads or max(1, (os.cpu_count() or 1) // exp.train.processes)


def train_distributed(exp: Experiment, seed: int, split: Split, device: torch.device, on_epoch=None,
                      on_batch=None) -> RunResult:
    """Train ``exp`` in ``exp.train.processes`` processes; the result is rank 0's, as :func:`train` returns it."""
    import torch.multiprocessing as mp

    world = exp.train.processes
    check_supported(exp, device)  # the CPU or CUDA, with a GPU per process
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="cnnbench-ddp-") as out:
        procs = [ctx.Process(target=_worker, args=(rank, world, port, exp, seed, split, device.type, messages, out),
                             daemon=True) for rank in range(world)]
        for p in procs:
            p.start()
        try:
            while any(p.is_alive() for p in procs):
                _relay(messages, on_epoch, on_batch, timeout=0.2)
            _relay(messages, on_epoch, on_batch, timeout=0.0)  # what came in after the last check
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
        saved = Path(out) / "result.pt"
        if failed or not saved.exists():
            error = (Path(out) / "error.txt").read_text() if (Path(out) / "error.txt").exists() else ""
            raise RuntimeError(f"data-parallel training failed (rank, exit code: {failed}){': ' + error if error else ''}")
        state = torch.load(saved, weights_only=False)
    model = initial_model(exp, seed, split.data)
    model.load_state_dict(state.pop("model"))
    result = RunResult(model=model.to(device), **state)
    result.tags["cnnbench.data_parallel"] = (f"{world} processes × {threads_per_process(exp)} threads, DDP "
                                             f"({'gloo' if device.type == 'cpu' else 'nccl'}), "
                                             f"{exp.data.batch_size // world} images per process per batch")
    return result


def _relay(messages, on_epoch, on_batch, timeout: float) -> None:
    """Pass rank 0's progress on to the caller's callbacks (which may raise to stop the run): wait up to
    ``timeout`` for the first message, then take everything already waiting."""
    wait = timeout
    while True:
        try:
            kind, payload = messages.get(timeout=wait) if wait else messages.get_nowait()
        except queue_module.Empty:
            return
        wait = 0.0
        if kind == "epoch" and on_epoch is not None:
            on_epoch(payload)
        elif kind == "batch" and on_batch is not None:
            on_batch(*payload)


def _worker(rank: int, world: int, port: int, exp: Experiment, seed: int, split: Split, device_type: str,
            messages, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads_per_process(exp))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        lead = rank == 0
        result = train(exp, seed, split, device, rank_world=(rank, world), evaluate_test=lead,
                       on_epoch=(lambda record: messages.put(("epoch", record))) if lead else None,
                       on_batch=(lambda b, n: messages.put(("batch", (b, n)))) if lead else None)
        if lead:
            torch.save({"model": {k: v.cpu() for k, v in result.model.state_dict().items()}, "status": result.status,
                        "history": result.history, "metrics": result.metrics, "confusion": result.confusion,
                        "message": result.message}, Path(out) / "result.pt")
    except Exception as e:  # noqa: BLE001 - the parent reports it
        (Path(out) / "error.txt").write_text(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
