"""Ctrl-C and SIGTERM while a suite runs: the signal handler only records the request; training
loops, searches and workers check it at every batch and epoch and raise :class:`Interrupted` from a
safe place. Raising inside the handler could land inside a garbage-collector callback, where Python
ignores the exception."""

from __future__ import annotations

_requested: list[int] = []  # exit codes of signals received while a suite runs


class Interrupted(BaseException):
    """Ctrl-C (exit 130) or SIGTERM (exit 143): in-flight runs were ended as KILLED."""

    def __init__(self, exit_code: int = 130):
        super().__init__(f"interrupted (exit {exit_code})")
        self.exit_code = exit_code


def request_interrupt(code: int) -> None:
    """Called from a signal handler: only records the request."""
    _requested.append(code)


def interrupt_requested() -> int | None:
    """The exit code of the first signal received, if any."""
    return _requested[0] if _requested else None


def raise_if_interrupted() -> None:
    if _requested:
        raise Interrupted(_requested[0])


def clear_interrupt() -> None:
    _requested.clear()


def interruptible(on_batch):
    """A per-batch hook that first honours a pending Ctrl-C / SIGTERM."""

    def hook(done: int, total: int) -> None:
        raise_if_interrupted()
        on_batch(done, total)

    return hook
