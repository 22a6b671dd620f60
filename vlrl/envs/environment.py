"""Environments: what answers the model between its turns.

Single-turn is the special case of an environment that ends after one reply: no `env.environment`, the
dataset's prompt, one completion, the configured rewards. A multi-turn environment starts an episode from a
sample (`reset`), reads each assistant turn (`step`) and replies (tool results, feedback: text and images),
until it says it is done or a budget ends the episode (`env.max_turns`, `model.max_model_len`,
`model.max_images_per_prompt`). The configured rewards then score the last assistant turn; rewards the
environment gave along the way (`Reply.reward`) are added to the total as the reward `env`.

The default `step` is tool use in Qwen3-VL's format (`envs/tools.py`): the calls of the turn are run and their
results returned as tool messages; a turn without a call ends the episode (it is the answer). Your own
environment is a class named by `module:Class` (env.environment), constructed with no arguments:

    from vlrl.envs.environment import Environment, Reply
    from vlrl.envs.tools import Tool

    class Lookup(Environment):
        tools = [Tool("lookup", "Look a word up.",
                      {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
                      lambda sample, state, word: WORDS[word])]

An environment that raises in `reset` or `step`, or returns something other than a `Reply`, makes its sample a
bad sample (skipped and named, or the run stops, as `env.on_bad_sample` says). At the turn budget `last_step`
answers instead of `step`: by default it runs no tool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import UserError
from .tools import Tool, parse_tool_calls, run_tool_calls

if TYPE_CHECKING:
    from ..config import EnvConfig


@dataclass
class Reply:
    """An environment's answer to one assistant turn."""

    messages: list[dict] = field(default_factory=list)
    """Messages to append (role `tool` or `user`); image parts are `{"type": "image"}`, in the order of
    `images`."""
    images: list[Image.Image] = field(default_factory=list)
    done: bool = False
    """The episode is over (the turn was the answer)."""
    reward: float | None = None
    """A reward for this turn (added to the trajectory's total as the reward `env`). Anything but a finite
    number fails the rollout's reward (`not_a_number`, `nan`), as a reward function returning it would."""
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)


class Environment:
    """A multi-turn environment with tools (override `tools`, and `reset` / `step` where needed)."""

    tools: list[Tool] = []
    tool_timeout_s: float = 10.0  # set from env.tool_timeout_s
    stop_at_tool_call: bool = False
    """End a turn as soon as a tool call is written (`</tool_call>`): one call per turn, and the environment
    closes the turn (its reply starts with the `<|im_end|>` the model would have written)."""

    def schemas(self) -> list[dict]:
        """The tools as the chat template renders them into the system turn."""
        return [t.schema for t in self.tools]

    def reset(self, sample) -> Any:
        """A new episode on `sample`; returns its state (handed to `step` and to the tools)."""
        return {}

    def step(self, sample, state, completion: str) -> Reply:
        """Reply to the assistant turn `completion`: run its tool calls, or end the episode if it made
        none."""
        tools = {t.name: t for t in self.tools}
        calls = parse_tool_calls(completion, tools)
        if not calls:
            return Reply(done=True)
        messages, images, errors = run_tool_calls(calls, tools, sample, state, self.tool_timeout_s)
        return Reply(messages=messages, images=images, tool_calls=len(calls), tool_errors=errors)

    def last_step(self, sample, state, completion: str) -> Reply:
        """Reply to the turn at env.max_turns: the episode ends whatever comes back, so a turn with tool calls
        gets nothing (no tool runs, none is counted: nothing would read the result) and ends at `max_turns`; a
        turn without one goes to `step` as any other (an answer, which `step` may score: `Reply.reward`)."""
        if parse_tool_calls(completion):
            return Reply()
        return self.step(sample, state, completion)


BUILTIN_ENVIRONMENTS = {"zoom": "vlrl.envs.zoom:ZoomEnv", "calculator": "vlrl.envs.calculator:CalculatorEnv"}


def load_environment(cfg: EnvConfig) -> Environment | None:
    """The environment `env.environment` names (`builtin:NAME` or `module:Class`); for a built-in task that is
    an environment's (`env.dataset = "builtin:zoom"`), that environment; else None (single-turn)."""
    import importlib

    name = cfg.environment
    if name is None and cfg.dataset.startswith("builtin:") and cfg.dataset[8:] in BUILTIN_ENVIRONMENTS:
        name = cfg.dataset
    if name is None:
        return None
    target = name
    if name.startswith("builtin:"):
        if name[8:] not in BUILTIN_ENVIRONMENTS:
            raise UserError(f"env.environment {name!r}: no such built-in environment "
                            f"(builtin:{', builtin:'.join(BUILTIN_ENVIRONMENTS)})")
        target = BUILTIN_ENVIRONMENTS[name[8:]]
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise UserError(f"env.environment {name!r}: expected builtin:NAME or module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"env.environment {name!r}: cannot load it ({type(e).__name__}: {e}); check the name "
                        "and that its directory is on PYTHONPATH") from None
    env = cls()
    if not isinstance(env, Environment):
        raise UserError(f"env.environment {name!r}: {attr} is not a vlrl.envs.environment.Environment")
    env.tool_timeout_s = cfg.tool_timeout_s
    return env
