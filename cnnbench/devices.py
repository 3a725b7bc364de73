"""cpu / cuda / mps / xla behind one small interface: resolve, move, step, synchronize, peak memory, describe.

torch_xla is imported lazily, only when an ``xla`` device is asked for (or ``auto`` finds one
configured through ``PJRT_DEVICE``), so nothing here costs anything on the other devices.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import resource
import sys
from functools import cache

import torch

XLA_INSTALL_HINT = (
    "install the TPU extra in its own environment: pip install torch==2.9.1 torchvision==0.24.1 "
    "&& pip install -e '.[tpu]' (torch_xla 2.9.0 needs exactly those torch versions; see README: TPU / XLA)"
)


class DeviceUnavailable(RuntimeError):
    """The requested device is not present; the run is recorded as skipped with this reason."""


class Unsupported(DeviceUnavailable):
    """The device is present but cannot do what the run asks (e.g. fp16 autocast); recorded as skipped."""


def xla_configured() -> bool:
    """torch_xla is installed and ``PJRT_DEVICE`` names a runtime (TPU, CPU, CUDA)."""
    return bool(os.environ.get("PJRT_DEVICE")) and importlib.util.find_spec("torch_xla") is not None


@cache
def _xla():
    """The torch_xla module, imported on first use (raises DeviceUnavailable with the install hint)."""
    try:
        import torch_xla
    except ImportError as e:
        raise DeviceUnavailable(f"device 'xla' requested but torch_xla is not importable ({e}); {XLA_INSTALL_HINT}") from None
    return torch_xla


def resolve(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then xla (only when configured), then cpu. Raises
    :class:`DeviceUnavailable` with the reason."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if xla_configured():
            return resolve("xla")
        return torch.device("cpu")
    if name == "xla":
        try:
            return _xla().device()
        except DeviceUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - a PJRT runtime that fails to start is an absent device
            raise DeviceUnavailable(f"device 'xla' requested but no XLA runtime started: {type(e).__name__}: {e} "
                                    "(set PJRT_DEVICE=TPU, CPU or CUDA)") from None
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device '{name}' requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"device '{name}' requested but MPS is not available on this machine")
    return dev


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device``: through pinned memory without blocking the host on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has none; TPUs emulate it slowly)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def step_done(device: torch.device) -> None:
    """End of one step: on XLA cut the lazy graph here (one graph per step, executed asynchronously);
    elsewhere nothing. Never waits for the device."""
    if device.type == "xla":
        _xla().sync()


def synchronize(device: torch.device) -> None:
    """Wait until every queued operation on ``device`` has finished (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xla":
        _xla().sync()
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()


def manual_seed(device: torch.device, seed: int) -> None:
    """Seed the device's own generator where ``torch.manual_seed`` does not reach it (XLA)."""
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed, device)


def rng_state(device: torch.device):
    """The device's own random state (dropout on the device), for a checkpoint; None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        return int(xm.get_rng_state(device))
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_rng_state(device: torch.device, state) -> None:
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(int(state), device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def compile_seconds(device: torch.device) -> float:
    """Seconds XLA has spent compiling graphs in this process so far (0 on other devices); callers
    take differences, so time spent compiling can be reported apart from steady-state throughput."""
    if device.type != "xla":
        return 0.0
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return data[1] / 1e9 if data else 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type in ("cpu", "xla"):
        try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max bytes allocated by tensors since the reset. TPU: the runtime's peak bytes in use.
    CPU (and XLA on the CPU, whose buffers live in host memory): the whole process's peak resident
    set size since the reset (Linux; elsewhere since the process started) — it includes the
    libraries and the in-memory dataset, so compare it between variants, not with other tools."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(device)
            if "peak_bytes_used" in info:
                return int(info["peak_bytes_used"])
        except RuntimeError:  # the CPU runtime has no allocator stats
            pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def describe(device: torch.device) -> dict[str, str]:
    """Name and versions for the environment record."""
    out = {"device": str(device), "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(
            device_name=props.name,
            device_memory_bytes=str(props.total_memory),
            device_capability=f"{props.major}.{props.minor}",
            cuda=str(torch.version.cuda),
            cudnn=str(torch.backends.cudnn.version()),
            cuda_driver=_nvidia_driver(),
        )
    elif device.type == "mps":
        out["device_name"] = f"Apple MPS ({platform.machine()}, macOS {platform.mac_ver()[0]})"
    elif device.type == "xla":
        import torch_xla.runtime as xr

        out.update(
            device_name=f"XLA {xr.device_type()}" + (f" ({cpu_model()})" if xr.device_type() == "CPU" else ""),
            torch_xla=_xla().__version__,
            pjrt_device=os.environ.get("PJRT_DEVICE", ""),
        )
    else:
        out["device_name"] = cpu_model()
    return out


def _nvidia_driver() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that decide what low precision costs: AVX-512 / AVX-512-BF16 / AMX run bf16 natively,
# AVX2-only CPUs emulate it (bf16 is then usually slower than fp32).
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                         "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_flags() -> str:
    """The flags above that this CPU has (Linux /proc/cpuinfo), plus torch's own dispatch level."""
    have = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    flags = " ".join(f for f in CPU_FLAGS_OF_INTEREST if f in have) or "unknown"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return f"{flags} (torch dispatch: {capability})"
