"""The set of reward functions a run scores with, and where each one runs so that none can stop a step.

- Built-ins (`exact_match`, `choice`, `multiple_choice`, `numeric`, `format`, `iou`: builtin_rewards.py) are
  pure and cheap: they run on threads of the trainer's process, each call under `env.reward_timeout_s`.
- `math` (math-verify, math_reward.py) and your own functions (`module:function`) run in worker processes
  (reward_pool.py): a call that passes `env.reward_timeout_s` has its process killed and replaced, where a
  thread could only be abandoned and would run on.
- `judge` (judge.py) asks an LLM through an OpenAI-compatible endpoint, many requests at once, under its own
  timeouts and retries (`[env.rewards.judge]`).
A function that raises, hangs, crashes its process, or returns something that is not a finite number marks that
sample as failed (reward None): counted by reason, named in `RewardResult.errors`, and the run goes on.
"""

from __future__ import annotations

import importlib
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import RewardSpec
from ..errors import UserError
from .builtin_rewards import BUILTIN_REWARDS, RewardFn
from .dataset import Sample

KNOWN = (*BUILTIN_REWARDS, "math", "judge")
FAILURE_REASONS = ("raised", "timeout", "crashed", "nan", "none", "not_a_number", "unparseable", "judge_failed")
MAX_ERRORS = 8
Outcome = tuple[float | None, str | None, str]
"""A call's result: (reward or None, failure reason or None, detail for the error message)."""


class RewardError(UserError):
    """A reward the config names cannot be used; the message names the spec and what to do."""


class RewardFailure(Exception):
    """Raised by a reward function to fail a sample under a reason of its own (counted as
    `reward_failures/<reason>`), e.g. the judge's "unparseable" reply."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _math() -> RewardFn:
    try:
        import math_verify  # noqa: F401 - fail here, at start-up, rather than in every call
    except ImportError:
        raise RewardError("reward 'math' needs math-verify: pip install 'math-verify>=0.9,<0.10'") from None
    from .math_reward import math_reward

    return math_reward


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward by name, or `module:function` (dots after the colon reach attributes)."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if name == "math":
        return _math()
    if ":" not in name:
        raise RewardError(
            f"reward {name!r}: not a built-in reward ({', '.join(KNOWN)}); for your own function "
            f"write module:function"
        )
    mod_name, _, attr = name.partition(":")
    if not mod_name or not attr:
        raise RewardError(f"reward {name!r}: expected module:function, e.g. my_rewards:score")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - importing user code may raise anything
        raise RewardError(
            f"reward {name!r}: module {mod_name!r} could not be imported ({type(e).__name__}: {e}); "
            f"check its name and that its directory is on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(
                f"reward {name!r}: module {mod_name!r} has no attribute {attr!r}; check the name"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {name!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj



# --- running calls -----------------------------------------------------------------------------------
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



def check_value(value: Any) -> tuple[float | None, str | None]:
    """(reward, None) for a finite number (bools count), else (None, reason)."""
    if value is None:
        return None, "none"
    if isinstance(value, (str, bytes, complex)) or not hasattr(value, "__float__"):
        return None, "not_a_number"
    try:  # numbers, bools, numpy scalars, one-element tensors
        v = float(value)
    except (TypeError, ValueError):
        return None, "not_a_number"
    if not math.isfinite(v):
        return None, "nan"
    return v, None

def outcome_of(status: str, payload: Any, timeout_s: float) -> Outcome:
    """A call's ("ok", value) / ("raised", exception) / ("timeout", None) as an Outcome."""
    if status == "ok":
        value, reason = check_value(payload)
        return value, reason, f"returned {payload!r:.80}"
    if status == "raised":
        if isinstance(payload, RewardFailure):
            return None, payload.reason, payload.detail
        return None, "raised", f"raised {type(payload).__name__}: {payload}"
    return None, "timeout", f"did not return within {timeout_s:g} s"


def call_outcome(call: Callable[[], Any]) -> Outcome:
    """Run `call` here and now (a reward process's main thread) and return its Outcome."""
    try:
        return outcome_of("ok", call(), 0.0)
    except BaseException as e:  # noqa: BLE001 - a user function may raise anything, even SystemExit
        return outcome_of("raised", e, 0.0)


@dataclass
class RewardResult:
    """Rewards of one batch: None marks a sample some reward function failed on."""

    total: list[float | None]
    """Weighted sum of the functions per sample; None when any function failed for that sample."""
    per_fn: dict[str, list[float | None]]
    """Each function's value per sample, keyed by the spec's `fn` (a repeated fn gets `#2`, `#3`...)."""
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    """Failed calls by reason: raised, timeout, crashed (the call took its process down), nan (NaN or inf),
    none, not_a_number, and the judge's unparseable (no score in its reply) and judge_failed (no reply)."""
    errors: list[str] = field(default_factory=list)
    """The first few failure messages, naming the function, the sample and the reason."""


def _light(sample: Sample) -> Sample:
    """What `math` reads of a sample: its id and answer (no images to pickle)."""
    return Sample(id=sample.id, question="", answer=sample.answer)


class RewardSet:
    """The configured reward functions and their weights; `score` never raises for a failing function.

    `processes`: most worker processes for `math` and user functions (default: min(4, CPUs)). `close()` ends
    them (they also end with the trainer, or when the set is garbage-collected).
    """

    def __init__(self, specs: list[RewardSpec], timeout_s: float, max_workers: int = 16,
                 processes: int | None = None):
        if not specs:
            raise RewardError('env.rewards is empty; list at least one reward, e.g. {fn = "exact_match"}')
        self.specs = list(specs)
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.where: list[str] = []  # per spec: "thread", "process" or "judge"
        self.runners: list[Any] = []  # per spec: the function, its name, or the Judge
        for s in self.specs:
            if s.fn == "judge":
                from .judge import Judge

                self.where.append("judge")
                self.runners.append(Judge(s.judge))
            elif s.fn in BUILTIN_REWARDS:
                self.where.append("thread")
                self.runners.append(BUILTIN_REWARDS[s.fn])
            else:
                resolve_reward(s.fn)  # a bad name fails now, with its message, not in every call
                self.where.append("process")
                self.runners.append(s.fn)
        self.keys: list[str] = []
        for s in self.specs:
            key, k = s.fn, 1
            while key in self.keys:
                k += 1
                key = f"{s.fn}#{k}"
            self.keys.append(key)
        self.pool = None
        if "process" in self.where:
            from .reward_pool import RewardPool

            names = sorted({r for r, w in zip(self.runners, self.where) if w == "process"})
            self.pool = RewardPool(names, processes)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _outcomes(self, completions: list[str], samples: list[Sample]) -> list[list[Outcome]]:
        """Per spec, per sample: the process pool and each judge run on threads of their own while the built-ins
        run here. (A bug in any of them still raises here, after all have finished.)"""
        n = len(samples)
        out: list[list[Outcome]] = [[] for _ in self.specs]
        side: list[Callable[[], None]] = []
        jobs = [(j, r) for j, (r, w) in enumerate(zip(self.runners, self.where)) if w == "process"]
        if jobs:
            def pooled() -> None:
                calls = [(r, c, _light(s) if r == "math" else s) for _, r in jobs for c, s in zip(completions, samples)]
                flat = self.pool.run(calls, self.timeout_s)
                for k, (j, _) in enumerate(jobs):
                    out[j] = flat[k * n : (k + 1) * n]

            side.append(pooled)
        for j, (r, w) in enumerate(zip(self.runners, self.where)):
            if w == "judge":
                side.append(lambda j=j, r=r: out.__setitem__(j, r.score(completions, samples)))
        errors: list[BaseException] = []

        def guarded(fn: Callable[[], None]) -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(fn,), name="vlrl-rewards", daemon=True) for fn in side]
        for t in threads:
            t.start()
        inline = [j for j, w in enumerate(self.where) if w == "thread"]
        calls = [(lambda fn=self.runners[j], c=c, s=s: fn(c, s)) for j in inline for c, s in zip(completions, samples)]
        flat = run_bounded(calls, self.timeout_s, self.max_workers)
        for k, j in enumerate(inline):
            out[j] = [outcome_of(st, p, self.timeout_s) for st, p in flat[k * n : (k + 1) * n]]
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def score(self, completions: list[str], samples: list[Sample]) -> RewardResult:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        n = len(samples)
        outcomes = self._outcomes(completions, samples)
        result = RewardResult(total=[0.0] * n, per_fn={})
        for spec, key, per_sample in zip(self.specs, self.keys, outcomes):
            values: list[float | None] = []
            for i, (sample, (value, reason, detail)) in enumerate(zip(samples, per_sample)):
                values.append(value)
                if reason is not None:
                    result.failures[reason] = result.failures.get(reason, 0) + 1
                    if len(result.errors) < MAX_ERRORS:
                        result.errors.append(f"reward {spec.fn} on sample {sample.id}: {detail} ({reason})")
                total = result.total[i]
                result.total[i] = None if value is None or total is None else total + spec.weight * value
            result.per_fn[key] = values
        return result
