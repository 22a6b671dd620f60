"""The set of reward functions a run scores with, and where each one runs so that none can stop a step.

- Built-ins (`exact_match`, `choice`, `multiple_choice`, `numeric`, `format`, `iou`: builtin.py) are
  pure and cheap: they run on threads of the trainer's process, each call under `env.reward_timeout_s`.
- `math` (math-verify, math_reward.py) and your own functions (`module:function`) run in worker processes
  (pool.py): a call that passes `env.reward_timeout_s` has its process killed and replaced, where a
  thread could only be abandoned and would run on.
- `judge` (judge.py) asks an LLM through an OpenAI-compatible endpoint, many requests at once, under its own
  timeouts and retries (`[env.rewards.judge]`).
A function that raises, hangs, crashes its process, or returns something that is not a finite number marks
that sample as failed (reward None): counted by reason, named in `RewardResult.errors`, and the run goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..bounded import run_bounded
from ..config import RewardSpec
from ..sample import Sample
from .base import FAILURE_REASONS, MAX_ERRORS, Outcome, RewardError, outcome_of, resolve_reward
from .builtin import BUILTIN_REWARDS


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
            from .pool import RewardPool

            names = sorted({r for r, w in zip(self.runners, self.where) if w == "process"})
            self.pool = RewardPool(names, processes)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _outcomes(self, completions: list[str], samples: list[Sample]) -> list[list[Outcome]]:
        """Per spec, per sample: the process pool and each judge run on threads of their own while the
        built-ins run here. (A bug in any of them still raises here, after all have finished.)"""
        n = len(samples)
        out: list[list[Outcome]] = [[] for _ in self.specs]
        side: list[Callable[[], None]] = []
        jobs = [(j, r) for j, (r, w) in enumerate(zip(self.runners, self.where)) if w == "process"]
        if jobs:
            def pooled() -> None:
                calls = [(r, c, _light(s) if r == "math" else s)
                         for _, r in jobs for c, s in zip(completions, samples)]
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

        threads = [threading.Thread(target=guarded, args=(fn,), name="vlrl-rewards", daemon=True)
                   for fn in side]
        for t in threads:
            t.start()
        inline = [j for j, w in enumerate(self.where) if w == "thread"]
        calls = [(lambda fn=self.runners[j], c=c, s=s: fn(c, s))
                 for j in inline for c, s in zip(completions, samples)]
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
