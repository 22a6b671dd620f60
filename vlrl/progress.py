"""The progress bars of long work (training steps, eval prompts): one rich bar, its extra columns per use."""

from __future__ import annotations


class Bar:
    """`label  ━━━━  done/total  <columns>  ETA`; `columns` are rich format strings over the task's fields
    (e.g. "reward {task.fields[reward]}"), whose initial values `fields` gives. Disabled: every call is a
    no-op."""

    def __init__(self, console, label: str, total: int | None = None, start: int = 0, enabled: bool = True,
                 columns: tuple[str, ...] = (), fields: dict | None = None):
        self.console, self.label, self.total, self.start, self.enabled = console, label, total, start, enabled
        self.columns, self.fields = columns, fields or {}
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                *(TextColumn(c) for c in self.columns), TimeRemainingColumn(), console=self.console,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=self.total,
                                               completed=self.start, **self.fields)
        return self

    def update(self, completed: int, total: int | None = None, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, total=total, **fields)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


def train_bar(console, total: int, start: int, enabled: bool) -> Bar:
    """Training: step, live reward and accuracy, seconds per step (fed by `train_fields`)."""
    return Bar(console, "train", total, start, enabled,
               ("reward [cyan]{task.fields[reward]}[/] acc [cyan]{task.fields[acc]}[/]",
                "{task.fields[step_time]} s/step"), {"reward": "-", "acc": "-", "step_time": "-"})


def train_fields(m: dict) -> dict:
    """The bar's fields from one step's metrics."""
    return {"reward": f"{m['reward/mean']:.3f}", "acc": f"{m['accuracy']:.2f}",
            "step_time": f"{m['time/step']:.1f}"}


def eval_bar(console, enabled: bool) -> Bar:
    """Eval: prompts scored of prompts in all (the total is known once the first batch starts)."""
    return Bar(console, "eval", None, 0, enabled, ("prompts",))
