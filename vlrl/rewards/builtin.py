"""Built-in reward functions `(completion, sample) -> float`: pure, cheap checks that run in the trainer's
own process (on threads). The `math` reward (math-verify) is in math_reward.py, the LLM judge in judge.py.

They check only the answer part of a completion (the text after the last `</think>`), so a model's reasoning
can mention candidate answers without being scored on them.
"""

from __future__ import annotations

import math
import numbers
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from ..sample import Sample

RewardFn = Callable[[str, Sample], float]
THINK_END = "</think>"


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
    numeric answer within a relative tolerance of 1e-6.

    Kept beside `math` (math-verify) for what that one gets wrong: scientific notation, which math-verify
    reads with `e` as Euler's number (`1.2e-9` becomes -9 + 1.2e), and small magnitudes, which it compares
    after rounding to 6 decimals (so 1.2e-6 equals 1.3e-6 there). It is also pure Python on a thread (~20 us a
    call, no sympy, no worker process). For anything symbolic (fractions, radicals, sets...) use `math`."""
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
    return float(first is not None
                 and any(normalize(str(first)) == normalize(str(a)) for a in _answers(sample)))


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "choice": choice,
    "multiple_choice": multiple_choice,
    "numeric": numeric,
    "format": format_reward,
    "iou": iou,
}
