"""The environment capsule recorded with every run: enough to reproduce it."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(cwd: str | Path | None = None) -> str:
    """Commit of the code that ran (cnnbench's checkout, else the cwd's repo), '+dirty' if modified."""
    here = Path(cwd or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def command_line() -> str:
    """The command as the user typed it (console script name instead of the module path)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cnnbench", "__main__.py")):
        argv[0] = "cnnbench"
    return shlex.join(argv)


def capsule(device=None, command: str | None = None) -> dict[str, str]:
    """cnnbench/torch/… versions, platform, CPU, threads, git commit, command, and the device."""
    import torch

    from cnnbench import __version__
    from cnnbench.devices import cpu_flags, cpu_model, describe

    env = {
        "cnnbench": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "mlflow": _version("mlflow"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "hostname": platform.node(),
        "command": command or command_line(),
        "cwd": os.getcwd(),
    }
    if device is not None:
        env.update(describe(device))
    return env
