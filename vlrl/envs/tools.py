"""Tools in the Qwen models' own formats: schemas for the chat template, calls parsed from `<tool_call>`
blocks, results back as tool messages that may hold images.

Qwen3-VL writes `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (JSON, its chat template's
words); Qwen3.5 writes XML inside the same tags, `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE
\\n</parameter>\\n</function>\\n</tool_call>`, each value as its template renders it (text as is, objects and
lists as JSON), so a value is read back by the type the tool's schema gives that argument (an integer from
"10", a string kept as written); with no schema, as JSON where it parses. Both forms are read whatever the
model. A last call left unclosed at the end of the turn counts, as in vLLM's Hermes/Qwen tool parsers.
Whatever goes wrong with a call (JSON or XML that does not parse, an unknown tool, arguments its schema
refuses, a tool that raises or runs past `env.tool_timeout_s`) becomes an error message the model reads as
that call's result, counted by reason; the episode goes on. Arguments are checked with `jsonschema` against
the tool's own schema.
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
XML_FUNCTION_RE = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>\s*$|$)", re.DOTALL)
XML_PARAMETER_RE = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)
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


def parse_tool_calls(text: str, tools: dict[str, Tool] | None = None) -> list[Call]:
    """Every `<tool_call>` of an assistant turn, in order (`tools`: by name, whose schemas type the arguments
    of XML calls)."""
    calls = []
    for m in TOOL_CALL_RE.finditer(text):
        body = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        if body.startswith("<function="):
            calls.append(_xml_call(body, tools or {}))
            continue
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


def _xml_call(body: str, tools: dict[str, Tool]) -> Call:
    """A Qwen3.5 call: `<function=NAME>` then `<parameter=ARG>\\nVALUE\\n</parameter>` per argument."""
    m = XML_FUNCTION_RE.match(body)
    name = m.group(1).strip() if m else ""
    if not name:
        return Call(error=("malformed", "a tool call must be <function=NAME> then <parameter=ARG> blocks"))
    inner = m.group(2)
    if inner.strip() and not inner.lstrip().startswith("<parameter="):
        return Call(name=name, error=("malformed", f"text inside <function={name}> that is not a "
                                                   "<parameter=...> block"))
    tool = tools.get(name)
    properties = (tool.parameters.get("properties") or {}) if tool is not None else {}
    args: dict[str, Any] = {}
    for p in XML_PARAMETER_RE.finditer(inner):
        key, value = p.group(1).strip(), p.group(2)
        value = value[1:] if value.startswith("\n") else value  # the template's newlines around the value
        value = value[:-1] if value.endswith("\n") else value
        args[key] = _typed(value, (properties.get(key) or {}).get("type"))
    return Call(name=name, arguments=args)


def _typed(value: str, kind) -> Any:
    """An XML argument's text as the schema's type has it (a string stays as written); no type: JSON if it
    parses. A value that is not of its type stays a string, which the schema check then reports."""
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if kinds == {"string"}:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


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
