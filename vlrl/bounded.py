"""Running a call under a deadline on threads: reward functions (rewards/reward_set.py), tools (envs/tools.py)
and environments (rollout/episodes.py) all run user code this way, so one hanging call cannot stall a step."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


def run_bounded(
    calls: list[Callable[[], Any]], timeout_s: float, max_workers: int = 16
) -> list[tuple[str, Any]]:
    """Run each call on daemon threads, each bounded by `timeout_s` from the moment it starts.

    Returns per call ("ok", value), ("raised", exception) or ("timeout", None). A timed-out call's thread is
    abandoned (never joined; being a daemon it cannot hold up interpreter exit) and a fresh worker takes its
    place, so one hanging function cannot stall the calls queued behind it.
    """
    n = len(calls)
    results: list[tuple[str, Any] | None] = [None] * n
    started: list[float | None] = [None] * n
    abandoned: set[int] = set()
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    cond = threading.Condition()

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            with cond:
                started[i] = time.monotonic()
            try:
                out: tuple[str, Any] = ("ok", calls[i]())
            except BaseException as e:  # noqa: BLE001 - a user function may raise anything, even SystemExit
                out = ("raised", e)
            with cond:
                if i in abandoned:
                    return  # a replacement worker already took over the queue
                results[i] = out
                cond.notify_all()

    def spawn() -> None:
        threading.Thread(target=worker, name="vlrl-reward", daemon=True).start()

    for _ in range(min(max_workers, n)):
        spawn()
    with cond:
        while True:
            now = time.monotonic()
            pending, next_deadline = 0, math.inf
            for i in range(n):
                if results[i] is not None:
                    continue
                t0 = started[i]
                if t0 is not None and now - t0 >= timeout_s:
                    results[i] = ("timeout", None)
                    abandoned.add(i)
                    spawn()
                    continue
                pending += 1
                if t0 is not None:
                    next_deadline = min(next_deadline, t0 + timeout_s)
            if pending == 0:
                break
            cond.wait(timeout=min(max(next_deadline - now, 0.001), 0.05))
    return [r for r in results if r is not None]
