"""Model measurements that do not depend on training: FLOPs (and, with the compression issue,
latency, size on disk and non-zero parameter counts)."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode


def flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...], backward: bool = False) -> float:
    """FLOPs of one sample's forward pass (``backward=True``: forward + backward, i.e. a training
    step without the optimizer), counted once by ``torch.utils.flop_counter`` on a CPU copy of the
    model with a batch of 2 (batch norm in training mode needs more than one sample). The copy keeps
    the model's hooks, so a hook sees this pass too."""
    probe = copy.deepcopy(model).to("cpu").float()
    probe.train(backward)
    x = torch.zeros(2, *input_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.random.fork_rng(devices=[]):  # dropout in the probe must not move the run's RNG
        if backward:
            probe(x).sum().backward()
        else:
            with torch.no_grad():
                probe(x)
    return counter.get_total_flops() / 2


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The best FLOP/s a square matmul reaches on ``device`` in ``dtype`` with the current thread
    count: the denominator of MFU. Measured once (~0.5 s) and cached per (device name, torch,
    threads, dtype) in ``$CNNBENCH_CACHE_DIR`` (default ``~/.cache/cnnbench``). None on XLA/MPS,
    where no peak is measured."""
    if device.type not in ("cpu", "cuda"):
        return None
    import json
    import os
    import time
    from pathlib import Path

    from cnnbench import devices

    name = devices.describe(device)["device_name"]
    key = f"{name}|torch {torch.__version__}|threads {torch.get_num_threads()}|{str(dtype).removeprefix('torch.')}"
    path = Path(os.environ.get("CNNBENCH_CACHE_DIR") or Path.home() / ".cache" / "cnnbench") / "matmul_peak.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, spent = 0.0, 0.0
    for i in range(200):
        devices.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        devices.synchronize(device)
        dt = time.perf_counter() - t0
        spent += dt
        if i > 0:  # the first product warms up the library
            best = max(best, 2 * n**3 / dt)
        if spent > 0.5 and best > 0:
            break
    cache[key] = best
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return best
