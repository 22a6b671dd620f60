"""`builtin:calculator`: arithmetic questions and a text tool, `calculate(expression)`.

The tool evaluates + - * / ** and parentheses over numbers, by walking Python's own parse tree of the
expression (never `eval`), with the size of powers bounded. Its answers are text: the example of a tool whose
results hold no image. The `numeric` reward scores the last assistant turn.
"""

from __future__ import annotations

import ast
import operator
import random

from .dataset import Sample
from .environment import Environment
from .tools import Tool

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression; ValueError for anything else."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        return walk(ast.parse(expression, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r} ({e.msg})") from None


def calculate(sample, state, expression: str) -> str:
    value = evaluate(expression)
    return str(int(value)) if float(value).is_integer() else f"{value:.10g}"


CALCULATE = Tool(
    name="calculate",
    description="Evaluate an arithmetic expression (+ - * / ** and parentheses).",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"],
                "additionalProperties": False},
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
