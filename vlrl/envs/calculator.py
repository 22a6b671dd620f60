"""`builtin:calculator`: arithmetic questions and a text tool, `calculate(expression)`.

The tool evaluates + - * / ** and parentheses over numbers, by walking Python's own parse tree of the
expression (never `eval`). Every intermediate result is bounded (|x| < 1e100) and a power is refused before it
is computed when its result would pass the bound: a big-integer power holds the GIL, so a thread's timeout
cannot stop it (`(((10**64)**64)**64)**64` froze the whole process for 12.5 s under a 2 s tool timeout). Its
answers are text: the example of a tool whose results hold no image. The `numeric` reward scores the last
assistant turn.
"""

from __future__ import annotations

import ast
import math
import operator
import random

from ..sample import Sample
from .environment import Environment
from .tools import Tool

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


# every value, the expression's own numbers and each intermediate result, stays below this in size
LIMIT = 1e100


def _bounded(value):
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError("the result is not a number")
    if abs(value) >= LIMIT:
        raise ValueError(f"a result is too large (the calculator works below {LIMIT:g})")
    return value


def _power(base, exponent):
    """base ** exponent, refused before it is computed when its size would pass LIMIT."""
    if abs(exponent) > 1e6:  # (the bound below also refuses these, except for |base| near 1: still no hang)
        raise ValueError("the exponent is too large")
    if (base != 0 and abs(base) != 1 and exponent > 0
            and exponent * math.log10(abs(base)) >= math.log10(LIMIT)):
        raise ValueError(f"a result is too large (the calculator works below {LIMIT:g})")
    return operator.pow(base, exponent)


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression; ValueError for anything else (or for a value of LIMIT or
    more)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
                and not isinstance(node.value, bool)):
            return _bounded(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            op = _power if isinstance(node.op, ast.Pow) else _OPS[type(node.op)]
            try:
                return _bounded(op(left, right))
            except OverflowError:
                raise ValueError(f"a result is too large (the calculator works below {LIMIT:g})") from None
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        return walk(ast.parse(expression, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r} ({e.msg})") from None


def calculate(sample, state, expression: str) -> str:
    value = evaluate(expression)
    # (a float's digits past 2**53 are noise)
    if isinstance(value, int) or (value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return f"{value:.10g}"


CALCULATE = Tool(
    name="calculate",
    description="Evaluate an arithmetic expression (+ - * / ** and parentheses).",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}},
                "required": ["expression"], "additionalProperties": False},
    fn=calculate,
)


class CalculatorEnv(Environment):
    tools = [CALCULATE]


def calculator_split(split: str, n: int, seed: int = 0) -> list[Sample]:
    """Products and sums of two- and three-digit numbers, too long to do in one's head."""
    out = []
    for i in range(n):
        rng = random.Random(f"calculator/{seed}/{split}/{i}")
        a, b, c = rng.randint(12, 999), rng.randint(12, 999), rng.randint(2, 99)
        expression = rng.choice([f"{a} * {b}", f"{a} * {b} + {c}", f"({a} + {b}) * {c}"])
        out.append(Sample(id=f"calculator-{split}-{i}", question=f"What is {expression}? Use the calculator.",
                          answer=int(evaluate(expression))))
    return out
