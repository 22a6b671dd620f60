"""Worker processes for reward calls that may hang: user functions (`module:function`) and `math`.

A thread cannot be stopped: a hung function on a thread is only abandoned, and runs on (holding the GIL,
memory, maybe a lock). A process can be killed. Each worker runs one call at a time in its main thread; a call
that passes its deadline gets its worker killed (SIGKILL) and replaced, and the calls queued behind it go on.

Start method: `forkserver`. By the time rewards run, the trainer has torch loaded with its OpenMP threads (and
CUDA, on a GPU), and `fork` from a threaded process copies locks that no thread will ever release in the
child, and CUDA cannot be used again in a forked child. `spawn` is safe but starts a fresh interpreter for
every worker, again for each killed one (and re-imports the parent's main module). `forkserver` spawns one
clean server once (no torch, no threads) with this module and the reward modules preloaded, then forks each
worker from it: safe like spawn, and a replacement costs a fork (bench/rewards.py measures both).

What crosses the pipe: the function's name, the completion, and the sample, pickled once per batch and sent
to a worker only the first time it needs it (a GRPO group holds `group_size` completions of one sample, and a
448x448 PIL image costs ~2 ms per call to pickle, send and unpickle: bench/rewards.py). What comes back is an
outcome, never the function's raw return value, so an unpicklable return cannot break the pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from .base import Outcome, call_outcome, resolve_reward


def _context():
    """The forkserver context, its server preloading this module, the reward set and math-verify (sympy takes
    ~1 s to import: a replacement worker must not pay it inside a call's clock). The preload list takes effect
    when the server starts, once per trainer process."""
    import importlib.util

    ctx = mp.get_context("forkserver")
    preload = ["vlrl.rewards.pool", "vlrl.rewards.base"]
    if importlib.util.find_spec("math_verify") is not None:
        preload += ["vlrl.rewards.math_reward", "math_verify"]
    ctx.set_forkserver_preload(preload)
    return ctx


READY = "ready"
STARTUP_S = 300.0
"""Most seconds a worker may take to start (fork, then import the reward modules) before it counts as
crashed. A start is never inside a call's `reward_timeout_s`: on a loaded machine, importing a user's module
took longer than the default 10 s, and the first calls of a run (or of a resumed run) timed out."""


def _worker_main(conn: Connection, sys_path: list[str], names: list[str]) -> None:
    """Run calls until the pipe closes: (name, completion, sample) in, an Outcome out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    sys.path[:] = sys_path  # the trainer's import path, as it is now (tests and users may have extended it)
    fns = {}
    for name in names:  # import the user's modules before the first call, not inside its clock
        try:
            fns[name] = resolve_reward(name)
        except Exception:  # noqa: BLE001 - reported by the call, which resolves again
            pass
    conn.send(READY)  # the pool starts a call's clock only now
    samples: dict[tuple[int, int], Any] = {}  # this batch's samples, as sent once by the trainer
    while True:
        try:
            name, completion, key, blob = conn.recv()
        except (EOFError, OSError):  # the trainer closed the pool or died: nothing left to do
            return
        try:
            if blob is not None:
                if any(k[0] != key[0] for k in samples):  # a new batch: forget the last one's samples
                    samples.clear()
                samples[key] = pickle.loads(blob)
            sample = samples[key]
            fn = fns[name] if name in fns else fns.setdefault(name, resolve_reward(name))
            outcome = call_outcome(lambda: fn(completion, sample))
        except Exception as e:  # noqa: BLE001
            outcome = (None, "raised", f"raised {type(e).__name__}: {e}")
        conn.send(outcome)


class _Worker:
    def __init__(self, ctx, names: list[str]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, list(sys.path), names), daemon=True,
                                name="vlrl-reward")
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.ready = False  # said so (its modules imported): from then on its calls are timed
        self.deadline = 0.0
        self.known: set[tuple[int, int]] = set()  # samples this worker holds
        self._kill_lock = threading.Lock()
        self._killed = False

    def wait_ready(self) -> str | None:
        """Until the worker has started (None), or why it never will."""
        if self.ready:
            return None
        try:
            if not self.conn.poll(STARTUP_S):
                return f"its reward process did not start within {STARTUP_S:g} s"
            if self.conn.recv() != READY:
                return "its reward process sent something else than its start"
        except (EOFError, OSError) as e:
            self.proc.join(5)
            return (f"its reward process died while starting (exit code {self.proc.exitcode}: "
                    f"{type(e).__name__})")
        self.ready = True
        return None

    def kill(self) -> None:
        """Once, from whichever thread comes first: a Ctrl-C closes the pool while a scoring thread may be
        killing the same worker for its deadline (closing its pipe twice raised EBADF and lost the exit)."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        try:
            self.conn.close()
        except OSError:  # a scoring thread's wait() on it at the same moment
            pass


class RewardPool:
    """Up to `size` worker processes; `run` gives each call its own deadline of `timeout_s` from its start."""

    def __init__(self, names: list[str], size: int | None = None):
        self.names = list(names)
        self.size = max(1, size or min(4, os.cpu_count() or 1))
        self.ctx = _context()
        self.alive: list[_Worker] = []  # every worker not yet killed, idle or busy
        self.idle: list[_Worker] = [self._start() for _ in range(self.size)]
        self.batch = 0
        # Workers are daemons (multiprocessing ends them when the trainer exits); a pool dropped earlier ends
        # its own when it is collected.
        self._finalizer = weakref.finalize(self, _kill_all, self.alive)

    def _start(self) -> _Worker:
        w = _Worker(self.ctx, self.names)
        self.alive.append(w)
        return w

    def _kill(self, w: _Worker) -> None:
        w.kill()
        try:
            self.alive.remove(w)
        except ValueError:  # close() took it first
            pass

    def run(self, calls: list[tuple[str, str, Any]], timeout_s: float) -> list[Outcome]:
        """Outcomes of `(name, completion, sample)` calls, in order. Never raises for a failing call."""
        self.batch += 1
        results: list[Outcome | None] = [None] * len(calls)
        todo = list(range(len(calls)))[::-1]
        busy: dict[Connection, _Worker] = {}
        index: dict[int, int] = {}  # id(sample) -> its number in this batch
        blobs: dict[int, bytes] = {}
        for w in self.idle:
            w.known.clear()
        while todo or busy:
            while todo and (self.idle or len(busy) < self.size):
                w = self.idle.pop() if self.idle else self._start()
                w.task = todo.pop()
                failed = w.wait_ready()
                if failed is not None:
                    results[w.task] = (None, "crashed", failed)
                    self._kill(w)
                    continue
                name, completion, sample = calls[w.task]
                key = (self.batch, index.setdefault(id(sample), len(index)))
                try:
                    if key not in w.known and key[1] not in blobs:
                        blobs[key[1]] = pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as e:  # noqa: BLE001 - a sample holding something unpicklable
                    results[w.task] = (None, "raised", f"its sample cannot be sent to a reward process "
                                                       f"({type(e).__name__}: {e})")
                    self.idle.append(w)
                    continue
                try:
                    w.conn.send((name, completion, key, None if key in w.known else blobs[key[1]]))
                except (OSError, ValueError) as e:  # the worker died while idle
                    results[w.task] = (None, "crashed",
                                       f"its reward process was gone ({type(e).__name__}: {e})")
                    self._kill(w)
                    continue
                w.known.add(key)
                w.deadline = time.monotonic() + timeout_s
                busy[w.conn] = w
            if not busy:  # every call handed out so far failed before it started
                continue
            next_deadline = min(w.deadline for w in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                w = busy.pop(conn)
                try:
                    results[w.task] = conn.recv()
                    self.idle.append(w)
                except (EOFError, OSError):  # the function took its process down (os._exit, a crash)
                    w.proc.join(5)
                    results[w.task] = (None, "crashed", f"crashed its process (exit code {w.proc.exitcode})")
                    self._kill(w)
            now = time.monotonic()
            for conn, w in list(busy.items()):
                if now >= w.deadline:
                    results[w.task] = (None, "timeout", f"did not return within {timeout_s:g} s")
                    del busy[conn]
                    self._kill(w)  # replaced on demand by the loop above
        return [r for r in results if r is not None]

    def close(self) -> None:
        self._finalizer()
        self.idle = []


def _kill_all(workers: list[_Worker]) -> None:
    while workers:
        try:
            w = workers.pop()
        except IndexError:  # a scoring thread's _kill took the last one
            return
        w.kill()
