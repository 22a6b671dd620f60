"""What every reward part builds on: the Outcome of one call, the failure reasons, resolving a reward by name,
and turning a call's result into an Outcome. The reward set (reward_set.py), the process pool (pool.py) and
the judge (judge.py) import this module; it imports none of them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from ..errors import UserError
from .builtin import BUILTIN_REWARDS, RewardFn

KNOWN = (*BUILTIN_REWARDS, "math", "judge")
FAILURE_REASONS = ("raised", "timeout", "crashed", "nan", "none", "not_a_number", "unparseable",
                   "judge_failed")
Outcome = tuple[float | None, str | None, str]
"""A call's result: (reward or None, failure reason or None, detail for the error message)."""
MAX_ERRORS = 8
"""Failure messages a step keeps (the reward set, the rollout groups and eval stop at this many)."""


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
