"""Dataset samples, and the one place a sample becomes a chat prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sample:
    """One prompt of a dataset, with the answer its rewards check."""

    id: str
    question: str
    answer: Any = None
    images: list[Any] = field(default_factory=list)
    """Image sources (paths, URLs, data URIs, base64, PIL images), shown before the question."""
    base_dir: Path | None = None
    """Directory relative image paths resolve against (the data file's directory)."""
    history: list[dict] | None = None
    """Earlier chat turns (multi-turn prompts), text only, before the question's user turn."""
    meta: dict = field(default_factory=dict)


def encode_sample(adapter, sample: Sample, system_prompt: str | None, question_template: str):
    """Sample -> EncodedPrompt: system prompt, earlier turns, user turn with the images and the question."""
    question = question_template.format(question=sample.question)
    messages = adapter.build_messages(question, len(sample.images), system_prompt, sample.history)
    prompt = adapter.encode_prompt(messages, sample.images, sample.base_dir, name=f"sample {sample.id}")
    return prompt
