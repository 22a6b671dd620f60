"""Tools in Qwen3-VL's own format: schemas for the chat template, calls parsed from `<tool_call>` JSON,
results back as tool messages that may hold images.

The model writes `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (its chat template's words);
a last call left unclosed at the end of the turn counts, as in vLLM's Hermes/Qwen tool parser. Whatever goes
wrong with a call (JSON that does not parse, an unknown tool, arguments its schema refuses, a tool that raises
or runs past `env.tool_timeout_s`) becomes an error message the model reads as that call's result, counted by
reason; the episode goes on. Arguments are checked with `jsonschema` against the tool's own schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..bounded import run_bounded

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
ERROR_REASONS = ("malformed", "unknown_tool", "bad_arguments", "raised", "timeout")


@dataclass
class Tool:
    """A function the model may call. `fn(sample, state, **arguments)` returns text, an image, or a list of
    both; `parameters` is the JSON schema of its arguments (an object)."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]

    @property
    def schema(self) -> dict:
        """The function schema the chat template renders (OpenAI's form)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": self.parameters}}


@dataclass
class Call:
    """One parsed call: `name` and `arguments`, or `error` (reason, message) when it could not be read."""

    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None


def parse_tool_calls(text: str) -> list[Call]:
    """Every `<tool_call>` of an assistant turn, in order."""
    calls = []
    for m in TOOL_CALL_RE.finditer(text):
        body = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(Call(error=("malformed",
                                     f"the tool call is not valid JSON ({e.msg} at column {e.colno})")))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(Call(error=("malformed",
                                     'a tool call must be {"name": <tool name>, "arguments": {...}}')))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(Call(name=obj["name"],
                              error=("bad_arguments", "the arguments must be a JSON object")))
            continue
        calls.append(Call(name=obj["name"], arguments=args))
    return calls


def result_parts(result: Any) -> tuple[list[dict], list[Image.Image]]:
    """A tool's return value as message content parts and the images they place (in order)."""
    items = result if isinstance(result, (list, tuple)) else [result]
    parts, images = [], []
    for item in items:
        if isinstance(item, Image.Image):
            parts.append({"type": "image"})
            images.append(item)
        else:
            parts.append({"type": "text", "text": str(item)})
    return parts, images


def run_tool_calls(calls: list[Call], tools: dict[str, Tool], sample, state, timeout_s: float
                   ) -> tuple[list[dict], list[Image.Image], dict[str, int]]:
    """Run the calls (each bounded by `timeout_s`; a hung tool is abandoned on a daemon thread). Returns the
    tool messages (one per call, in order), the images they hold, and the failed calls by reason."""
    errors: dict[str, int] = {}
    results: list[Any] = [None] * len(calls)
    runnable = []
    for i, call in enumerate(calls):
        if call.error is None and call.name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            call.error = ("unknown_tool", f"there is no tool {call.name!r} (tools: {known})")
        if call.error is None:
            try:
                import jsonschema

                jsonschema.validate(call.arguments, tools[call.name].parameters)
            except jsonschema.ValidationError as e:
                call.error = ("bad_arguments", f"bad arguments for {call.name}: {e.message}")
        if call.error is None:
            runnable.append(i)
    outcomes = run_bounded(
        [lambda c=calls[i]: tools[c.name].fn(sample, state, **c.arguments) for i in runnable], timeout_s)
    for i, (status, value) in zip(runnable, outcomes):
        if status == "ok":
            results[i] = value
        elif status == "raised":
            calls[i].error = ("raised", f"{calls[i].name} failed: {type(value).__name__}: {value}")
        else:
            calls[i].error = ("timeout", f"{calls[i].name} did not return within {timeout_s:g} s")
    messages, images = [], []
    for call, result in zip(calls, results):
        if call.error is not None:
            reason, text = call.error
            errors[reason] = errors.get(reason, 0) + 1
            result = f"Error: {text}"
        parts, imgs = result_parts(result)
        messages.append({"role": "tool", "content": parts})
        images.extend(imgs)
    return messages, images, errors
