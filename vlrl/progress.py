"""The training progress bar: step, live reward, step time and ETA."""

from __future__ import annotations


class TrainProgress:
    def __init__(self, console, total: int, start: int = 0, enabled: bool = True):
        self.console, self.total, self.start, self.enabled = console, total, start, enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("reward [cyan]{task.fields[reward]}[/] acc [cyan]{task.fields[acc]}[/]"),
                TextColumn("{task.fields[step_time]} s/step"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start,
                                               reward="-", acc="-", step_time="-")
        return self

    def advance(self, m: dict) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task, completed=m["step"], reward=f"{m['reward/mean']:.3f}", acc=f"{m['accuracy']:.2f}",
                step_time=f"{m['time/step']:.1f}",
            )

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
