"""Rich progress for ``cnnbench run``: suite → variant/seed → epoch, with live loss and accuracy."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cnnbench.config import RunSpec, Suite
from cnnbench.events import Events

STATUS_STYLE = {"finished": "green", "diverged": "yellow", "failed": "red", "skipped": "magenta",
                "complete": "green", "pruned": "yellow"}


class RichEvents(Events):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=quiet,
        )
        self.suite_task = self.run_task = self.search_task = None
        self.epochs = 1
        self.epochs_done = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def suite_start(self, suite: Suite, specs: list[RunSpec], reused: int) -> None:
        todo = len(specs) - reused
        if reused and not self.quiet:
            self.console.print(f"{reused} of {len(specs)} runs already finished with the same config: reused (--rerun to redo)")
        self.suite_task = self.progress.add_task(f"[bold]{suite.name}", total=todo)

    def round_start(self, planned: int) -> None:
        self.progress.update(self.suite_task, total=planned)  # the bar ends full when a suite stops early

    def run_start(self, spec: RunSpec, index: int, total: int) -> None:
        self.epochs = spec.experiment.train.epochs
        self.epochs_done = 0
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.run_task = self.progress.add_task(f"  {spec.run_name}", total=self.epochs)

    def batch(self, done: int, total: int) -> None:
        if self.run_task is not None and done % 20 == 0:  # called every batch; the bar needs far fewer updates
            self.progress.update(self.run_task, completed=self.epochs_done + done / total)

    def epoch(self, spec: RunSpec, record: dict) -> None:
        self.epochs_done = record["epoch"]
        self.progress.update(
            self.run_task,
            completed=record["epoch"],
            description=f"  {spec.run_name}  loss {record['train_loss']:.4f}  val acc {100 * record['val_accuracy']:.2f}%",
        )

    def run_end(self, spec: RunSpec, status: str, metrics: dict, message: str) -> None:
        self.progress.advance(self.suite_task)
        if self.quiet:
            return
        style = STATUS_STYLE.get(status, "white")
        detail = message
        if "test_accuracy" in metrics:  # post-training variants that did not fine-tune have no training throughput
            speed = metrics.get("train_throughput")
            detail = f"test acc {100 * metrics['test_accuracy']:.2f}%" + (f"  {speed:,.0f} img/s" if speed else "")
        self.console.print(f"  [{style}]{status:<8}[/] {spec.run_name:<28} {detail}")

    def trial_start(self, spec: RunSpec, done: int, total: int) -> None:
        if self.search_task is None:
            self.search_task = self.progress.add_task(f"[bold]search {spec.variant}", total=total, completed=done)
        self.run_start(spec, done, total)

    def trial_end(self, spec: RunSpec, state: str, value: float | None, message: str) -> None:
        self.progress.advance(self.search_task)
        if self.quiet:
            return
        detail = f"{value:.4f}  {message}" if value is not None else message
        self.console.print(f"  [{STATUS_STYLE.get(state, 'white')}]{state:<8}[/] {spec.run_name:<28} {detail}")

    def search_end(self, result) -> None:
        if self.search_task is not None:
            self.progress.remove_task(self.search_task)
            self.search_task = None
        if not self.quiet:
            best = (f"best {result.best_value:.4f} with {result.best_params}" if result.best_params is not None
                    else "no trial completed")
            counts = ", ".join(f"{v} {k}" for k, v in sorted(result.counts.items()))
            self.console.print(f"search {result.variant}: {best} ({counts}; {result.ran} run now)")

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"  {message}")

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}")  # also when quiet
