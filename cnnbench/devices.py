"""cpu / cuda / mps behind one small interface: resolve, check, synchronize, peak memory, describe.

(XLA/TPU arrives with the devices issue; ``device: xla`` is reported as unavailable until then.)
"""

from __future__ import annotations

import platform
import resource
import sys

import torch


class DeviceUnavailable(RuntimeError):
    """The requested device is not present; the run is recorded as skipped with this reason."""


def resolve(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu. Raises :class:`DeviceUnavailable` with the reason."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "xla":
        raise DeviceUnavailable("device 'xla' is not supported by this cnnbench version yet")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device '{name}' requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"device '{name}' requested but MPS is not available on this machine")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max bytes allocated by tensors since the reset. CPU: the whole process's peak resident
    set size since the reset (Linux; elsewhere since the process started) — it includes the
    libraries and the in-memory dataset, so compare it between variants, not with other tools."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
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
            cuda=str(torch.version.cuda),
            cudnn=str(torch.backends.cudnn.version()),
        )
    elif device.type == "mps":
        out["device_name"] = f"Apple MPS ({platform.machine()})"
    else:
        out["device_name"] = cpu_model()
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
