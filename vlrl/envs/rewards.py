"""Reward functions `(completion, sample) -> float`, and the set that scores a batch of completions safely.

The built-ins check only the answer part of a completion (the text after the last `</think>`), so a model's
reasoning can mention candidate answers without being scored on them. A reward set runs user functions on
daemon threads under a per-call timeout: a function that raises, hangs, or returns something that is not a
finite number marks that sample as failed (reward None) and is counted, and the run goes on.
"""

from __future__ import annotations

import importlib
import math
import numbers
import queue
import re
import string
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import RewardSpec
from ..errors import UserError
from .dataset import Sample

RewardFn = Callable[[str, Sample], float]
THINK_END = "</think>"
FAILURE_REASONS = ("raised", "timeout", "nan", "none", "not_a_number")
MAX_ERRORS = 8


class RewardError(UserError):
    """A reward the config names cannot be used; the message names the spec and what to do."""


# --- parsing helpers ------------------------------------------------------------------------------------
def answer_part(completion: str) -> str:
    """The text after the last `</think>`, or the whole completion when there is none."""
    i = completion.rfind(THINK_END)
    return completion if i < 0 else completion[i + len(THINK_END) :]


def _is_edge_punct(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c)[0] == "P"


def normalize(text: str) -> str:
    """Lowercase, inner whitespace collapsed, whitespace and punctuation stripped from both ends.

    A sign before a digit is kept, so "-3" and "3" stay different.
    """
    s = " ".join(text.lower().split())
    start, end = 0, len(s)
    while start < end and (s[start].isspace() or _is_edge_punct(s[start])):
        if s[start] in "+-" and start + 1 < end and s[start + 1].isdigit():
            break
        start += 1
    while end > start and (s[end - 1].isspace() or _is_edge_punct(s[end - 1])):
        end -= 1
    return s[start:end]


# A number starts where no word character, dot or closing bracket comes right before it: the digits of "x1"
# or "v1.5" are not numbers, and in "5-3" the minus is an operator, not the sign of 3.
_START = r"(?<![\w.)\]])"
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"{_START}([-+]?{_NUM})(?:\s*/\s*({_NUM}))?")
_COORD_RE = re.compile(rf"{_START}-?(?:\d+(?:\.\d+)?|\.\d+)")  # no thousands commas: "[10,200,...]"
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _to_float(num: str) -> float:
    return float(num.replace(",", ""))


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order: "1,000" -> 1000, "-3.5", "1/2" -> 0.5, "\\frac{1}{2}" -> 0.5."""
    text = _FRAC_RE.sub(r"\1/\2", text).replace("\u2212", "-")
    out = []
    for m in _NUMBER_RE.finditer(text):
        value = _to_float(m.group(1))
        if m.group(2) is not None:
            den = _to_float(m.group(2))
            value = value / den if den else math.nan
        out.append(value)
    return out


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (nested braces allowed), in order."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _answers(sample: Sample) -> list[Any]:
    """The sample's acceptable answers: a list or tuple holds alternatives."""
    if sample.answer is None:
        raise ValueError(f"sample {sample.id} has no answer to check")
    return list(sample.answer) if isinstance(sample.answer, (list, tuple)) else [sample.answer]


# --- built-in rewards -----------------------------------------------------------------------------------
def exact_match(completion: str, sample: Sample) -> float:
    """1.0 when the normalised answer part equals the normalised answer (or any of a list of answers)."""
    got = normalize(answer_part(completion))
    return float(any(got == normalize(str(a)) for a in _answers(sample)))


_LETTER_RE = re.compile(r"\b([A-J])\b")


def multiple_choice(completion: str, sample: Sample) -> float:
    """1.0 when the first standalone capital letter A-J of the answer part is the answer letter.

    "B", "(B)", "B." and "The answer is B" all pick B; the "T" of "The" is not standalone.
    """
    gold = normalize(str(sample.answer)).upper() if sample.answer is not None else ""
    if not re.fullmatch(r"[A-J]", gold):
        raise ValueError(f"sample {sample.id}: answer {sample.answer!r} is not a letter A-J")
    m = _LETTER_RE.search(answer_part(completion))
    return float(m is not None and m.group(1) == gold)


def _gold_number(sample: Sample) -> float:
    a = sample.answer
    if isinstance(a, numbers.Real):
        return float(a)
    found = numbers_in(str(a)) if a is not None else []
    if not found:
        raise ValueError(f"sample {sample.id}: answer {a!r} holds no number")
    return found[-1]  # "#### 72" style solutions end with the answer


def numeric(completion: str, sample: Sample) -> float:
    """1.0 when the number in the last `\\boxed{}` (else the last number of the answer part) equals the
    numeric answer within a relative tolerance of 1e-6."""
    gold = _gold_number(sample)
    text = answer_part(completion)
    boxed = boxed_contents(text)
    found = numbers_in(boxed[-1]) if boxed else numbers_in(text)
    if not found:
        return 0.0
    return float(math.isclose(found[-1], gold, rel_tol=1e-6, abs_tol=1e-12))


_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def format_reward(completion: str, sample: Sample) -> float:
    """1.0 for `<think>...</think>` followed by a non-empty answer, with no other think tags."""
    m = _FORMAT_RE.fullmatch(completion)
    if m is None:
        return 0.0
    thought, answer = m.group(1), m.group(2)
    if "<think>" in thought or "<think>" in answer or THINK_END in answer:
        return 0.0
    return float(bool(answer.strip()))


def _box(values: Sequence[Any]) -> tuple[float, float, float, float] | None:
    if len(values) < 4:
        return None
    return float(values[0]), float(values[1]), float(values[2]), float(values[3])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes; a box with x2 < x1 or y2 < y1 has no area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def iou(completion: str, sample: Sample) -> float:
    """IoU of the first four numbers of the answer part, read as [x1, y1, x2, y2], with the answer box."""
    a = sample.answer
    gold = _box(a) if isinstance(a, (list, tuple)) else _box(_COORD_RE.findall(str(a)))
    if gold is None:
        raise ValueError(f"sample {sample.id}: answer {a!r} is not a box [x1, y1, x2, y2]")
    pred = _box(_COORD_RE.findall(answer_part(completion)))
    return 0.0 if pred is None else box_iou(pred, gold)


def choice(completion: str, sample: Sample) -> float:
    """1.0 when the first of the sample's options (`sample.meta["options"]`) that the answer part mentions,
    as a whole word, is the answer. Listing every option scores only if the right one comes first, so the
    reward cannot be gamed by naming them all."""
    options = sample.meta.get("options")
    if not options:
        raise ValueError(f"sample {sample.id} has no meta['options'] for the choice reward")
    text = normalize(answer_part(completion))
    first, where = None, len(text) + 1
    for opt in options:
        m = re.search(rf"(?<!\w){re.escape(normalize(str(opt)))}(?!\w)", text)
        if m and m.start() < where:
            first, where = opt, m.start()
    return float(first is not None and any(normalize(str(first)) == normalize(str(a)) for a in _answers(sample)))


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "choice": choice,
    "multiple_choice": multiple_choice,
    "numeric": numeric,
    "format": format_reward,
    "iou": iou,
}


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward by name, or `module:function` (dots after the colon reach attributes)."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise RewardError(
            f"reward {name!r}: not a built-in reward ({', '.join(BUILTIN_REWARDS)}); for your own function "
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


# --- running a set of rewards ---------------------------------------------------------------------------
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


@dataclass
class RewardResult:
    """Rewards of one batch: None marks a sample some reward function failed on."""

    total: list[float | None]
    """Weighted sum of the functions per sample; None when any function failed for that sample."""
    per_fn: dict[str, list[float | None]]
    """Each function's value per sample, keyed by the spec's `fn` (a repeated fn gets `#2`, `#3`...)."""
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    """Failed calls by reason: raised, timeout, nan (NaN or inf), none, not_a_number."""
    errors: list[str] = field(default_factory=list)
    """The first few failure messages, naming the function, the sample and the reason."""


def _check_value(value: Any) -> tuple[float | None, str | None]:
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


class RewardSet:
    """The configured reward functions and their weights; `score` never raises for a failing function."""

    def __init__(self, specs: list[RewardSpec], timeout_s: float, max_workers: int = 16):
        if not specs:
            raise RewardError('env.rewards is empty; list at least one reward, e.g. {fn = "exact_match"}')
        self.specs = list(specs)
        self.fns = [resolve_reward(s.fn) for s in self.specs]
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.keys: list[str] = []
        for s in self.specs:
            key, k = s.fn, 1
            while key in self.keys:
                k += 1
                key = f"{s.fn}#{k}"
            self.keys.append(key)

    def score(self, completions: list[str], samples: list[Sample]) -> RewardResult:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        n = len(samples)
        calls = [(lambda fn=fn, c=c, s=s: fn(c, s)) for fn in self.fns for c, s in zip(completions, samples)]
        outcomes = run_bounded(calls, self.timeout_s, self.max_workers)
        result = RewardResult(total=[0.0] * n, per_fn={})
        for j, (spec, key) in enumerate(zip(self.specs, self.keys)):
            values: list[float | None] = []
            for i, sample in enumerate(samples):
                status, payload = outcomes[j * n + i]
                if status == "ok":
                    value, reason = _check_value(payload)
                    detail = f"returned {payload!r:.80}"
                elif status == "raised":
                    value, reason, detail = None, "raised", f"raised {type(payload).__name__}: {payload}"
                else:
                    value, reason, detail = None, "timeout", f"did not return within {self.timeout_s:g} s"
                values.append(value)
                if reason is not None:
                    result.failures[reason] += 1
                    if len(result.errors) < MAX_ERRORS:
                        result.errors.append(f"reward {spec.fn} on sample {sample.id}: {detail} ({reason})")
                total = result.total[i]
                result.total[i] = None if value is None or total is None else total + spec.weight * value
            result.per_fn[key] = values
        return result
