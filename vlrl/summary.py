"""End-of-run summary: the reward curve as a table a terminal can show."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of a log; a line still being written (a live run) is skipped, not an error."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def reward_curve(metrics: list[dict], rows: int = 10, width: int = 40):
    """A rich Table: mean reward and accuracy over equal runs of steps, with a bar per row."""
    from rich.table import Table

    table = Table(title="reward curve", header_style="bold")
    for col, justify in (("steps", "right"), ("reward", "right"), ("accuracy", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    if not metrics:
        return table
    size = max(1, -(-len(metrics) // rows))
    for i in range(0, len(metrics), size):
        chunk = metrics[i : i + size]
        reward = sum(m["reward/mean"] for m in chunk) / len(chunk)
        acc = sum(m["accuracy"] for m in chunk) / len(chunk)
        bar = "█" * round(max(0.0, min(1.0, reward)) * width)
        table.add_row(f"{chunk[0]['step']}-{chunk[-1]['step']}", f"{reward:.3f}", f"{acc:.2f}",
                      f"[green]{bar}[/]")
    return table
