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
    videos: list[Any] = field(default_factory=list)
    """Video sources (video files by path, URL, data URI or base64; lists of frames; `{"frames", "fps"}`),
    shown after the images."""
    base_dir: Path | None = None
    """Directory relative image paths resolve against (the data file's directory)."""
    history: list[dict] | None = None
    """Earlier chat turns (multi-turn prompts), text only, before the question's user turn."""
    meta: dict = field(default_factory=dict)


def encode_samples(adapter, samples: list[Sample], env_cfg, tools: list[dict] | None = None
                   ) -> tuple[list, list[Sample], list[tuple[Sample, str]]]:
    """Encode each sample (with `tools`, an environment's tool schemas, in its system turn); a sample the
    user's data makes unusable (missing or corrupt image, too many images, too long...) is skipped and
    reported, or stops the run, as `env.on_bad_sample` says.

    Returns (prompts, the samples they came from, [(bad sample, reason)]).
    """
    from ..errors import UserError

    prompts, kept, bad = [], [], []
    for s in samples:
        try:
            prompts.append(encode_sample(adapter, s, env_cfg.system_prompt, env_cfg.question_template,
                                         env_cfg.image_marker, tools))
            kept.append(s)
        except UserError as e:
            reason = str(e) if f"sample {s.id}" in str(e) else f"sample {s.id}: {e}"
            if env_cfg.on_bad_sample == "error":
                raise UserError(f"{reason} (to skip such samples and go on, set env.on_bad_sample = \"skip\")") from None
            bad.append((s, reason))
    return prompts, kept, bad


def encode_sample(adapter, sample: Sample, system_prompt: str | None, question_template: str,
                  image_marker: str | None = None, tools: list[dict] | None = None):
    """Sample -> EncodedPrompt: system prompt (and `tools`, an environment's), earlier turns, user turn with the
    images, videos and question (the images where the question's `image_marker`s are, else first)."""
    question = question_template.format(question=sample.question)
    messages = adapter.build_messages(question, len(sample.images), system_prompt, sample.history, image_marker,
                                      num_videos=len(sample.videos))
    return adapter.encode_prompt(messages, sample.images, sample.base_dir, name=f"sample {sample.id}",
                                 video_sources=sample.videos, tools=tools)
