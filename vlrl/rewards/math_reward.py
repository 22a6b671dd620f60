"""The `math` reward: math-verify (the checker of TRL's accuracy reward, verl, prime-rl) on the answer part.

It reads LaTeX and `\\boxed{}` answers, fractions, decimals, percentages, intervals, sets and equations, and
compares them symbolically (sympy): `\\boxed{0.5}` matches `\\frac{1}{2}`, `\\boxed{\\sqrt{12}}` matches
`2\\sqrt{3}`, `\\boxed{(1,2]}` matches the interval `(1, 2]`. The gold answer may be LaTeX or plain text: it
is read as the content of a `\\boxed{}` first (as verl does, so `(1, 2]` is an interval and `2\\sqrt{3}` is
not "2"), else as free text.

Bounded by killing, not by signals. math-verify's own timeout uses SIGALRM, which works only in a main thread
and cannot interrupt C code anyway: `\\boxed{10^{10^{10}}}` spends its time inside one big-integer power. So
its timeouts are off here, and the reward set runs this function in a worker process (pool.py) that is
killed and replaced when a call passes `env.reward_timeout_s`; the sample's reward is then a failure
("timeout"), never a hung step.
"""

from __future__ import annotations

import logging

from ..sample import Sample
from .builtin import answer_part


def _quiet() -> None:
    # math-verify warns once per process that its timeouts are off: here that is the design, not a risk.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_gold(answer) -> list:
    """The gold answer as math-verify reads it: `\\boxed{ANSWER}` as LaTeX, else ANSWER as free text."""
    from math_verify import LatexExtractionConfig, parse

    text = str(answer).strip()
    gold = parse("\\boxed{" + text + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    return gold or parse(text, parsing_timeout=None)


def math_reward(completion: str, sample: Sample) -> float:
    """1.0 when the answer part's final answer (its last `\\boxed{}`, else the last expression math-verify
    finds) is mathematically equal to the sample's answer (or any of a list of answers)."""
    from math_verify import parse, verify

    _quiet()
    answers = sample.answer if isinstance(sample.answer, (list, tuple)) else [sample.answer]
    if sample.answer is None or not answers:
        raise ValueError(f"sample {sample.id} has no answer to check")
    pred = parse(answer_part(completion), parsing_timeout=None)
    if not pred:
        return 0.0
    for a in answers:
        gold = parse_gold(a)
        if not gold:
            raise ValueError(f"sample {sample.id}: math-verify cannot read the answer {a!r}")
        if verify(gold, pred, timeout_seconds=None):
            return 1.0
    return 0.0
