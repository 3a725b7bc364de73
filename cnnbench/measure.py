"""Model measurements that do not depend on training: FLOPs (and, with the compression issue,
latency, size on disk and non-zero parameter counts)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...], backward: bool = False) -> float:
    """FLOPs of one sample's forward pass (``backward=True``: forward + backward, i.e. a training
    step without the optimizer), counted by ``torch.utils.flop_counter`` with a batch of 2 of zeros.

    Runs on the model itself (no copy: a pruned model's masked weights cannot be deep-copied), in
    eval mode so batch norm's running statistics and dropout's RNG are untouched; the gradients the
    probe makes are dropped (``grad = None``). Hooks on the model see this pass."""
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(2, *input_shape, device=param.device if param is not None else "cpu")
    counter = FlopCounterMode(display=False)
    model.eval()
    try:
        with counter, torch.random.fork_rng(devices=[]):
            if backward:
                model(x).sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
        if backward:
            for p in model.parameters():
                p.grad = None
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


# ───────────────────────── inference: latency, size, counts ─────────────────────────


def deployed_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a deployment of ``model`` needs. For an exported/converted graph (PT2E) these are the
    ones its graph reads (``get_attr`` nodes): the int8 weights, scales, zero points and biases — not the
    fp32 weights that ``convert_pt2e`` leaves behind as unused parameters. Otherwise: the state dict."""
    if isinstance(model, torch.fx.GraphModule):
        out = {}
        for node in model.graph.nodes:
            if node.op == "get_attr":
                value = model
                for part in node.target.split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    out[node.target] = value
        return out
    return dict(model.state_dict())


def serialized_size(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of ``torch.save`` of the tensors, each copied to its own compact storage (``torch.save``
    writes a view's whole storage, which would count bytes that are not deployed)."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, buf)
    return buf.getbuffer().nbytes


def model_size_bytes(model: torch.nn.Module) -> int:
    """Serialized size of what would be deployed (see :func:`deployed_tensors`)."""
    return serialized_size(deployed_tensors(model))


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters). Pruning masks must have been made permanent first
    (``prune.remove``), otherwise ``weight_orig`` still holds the dense values."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def latency_ms(model, input_shape: tuple[int, ...], batch_size: int, device: torch.device,
               repeats: int = 50, warmup: int = 10) -> tuple[float, float]:
    """Median and 95th percentile of the wall time of one forward pass of a ``batch_size`` batch, in ms:
    ``warmup`` calls first (untimed: lazy initialisation, compilation, caches), then ``repeats`` timed
    calls, each between two device synchronizations."""
    import time

    from cnnbench import devices

    x = torch.randn(batch_size, *input_shape, device=device)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            devices.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            devices.synchronize(device)
            times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64) * 1e3
    return float(t.quantile(0.5)), float(t.quantile(0.95))


def inference_metrics(deployed, float_model: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device,
                      repeats: int = 50, warmup: int = 10) -> dict[str, float]:
    """Every run's inference figures. ``deployed`` is what runs (e.g. a compiled int8 graph); ``float_model``
    is the float model it came from, for parameter counts and FLOPs (int8 ops are counted as their float ops).
    The size on disk is measured apart (``model_size_bytes``), on the model rather than a compiled wrapper."""
    out: dict[str, float] = {}
    for bs in (1, 64):
        p50, p95 = latency_ms(deployed, input_shape, bs, device, repeats, warmup)
        out[f"latency_bs{bs}_p50_ms"], out[f"latency_bs{bs}_p95_ms"] = p50, p95
    out["inference_throughput"] = 64 / (out["latency_bs64_p50_ms"] / 1e3)
    out["inference_threads"] = torch.get_num_threads()
    params, nonzero = param_counts(float_model)
    out["params"], out["nonzero_params"] = params, nonzero
    out["flops"] = flops_per_sample(float_model, input_shape)
    return out
