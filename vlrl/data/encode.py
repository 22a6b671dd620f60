"""The one place a dataset sample becomes a chat prompt (the adapter encodes it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..sample import Sample

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..config import EnvConfig
    from ..records import EncodedPrompt


def encode_samples(adapter: Adapter, samples: list[Sample], env_cfg: EnvConfig,
                   tools: list[dict] | None = None
                   ) -> tuple[list[EncodedPrompt], list[Sample], list[tuple[Sample, str]]]:
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
                raise UserError(f"{reason} (to skip such samples and go on, "
                                'set env.on_bad_sample = "skip")') from None
            bad.append((s, reason))
    return prompts, kept, bad


def encode_sample(adapter: Adapter, sample: Sample, system_prompt: str | None, question_template: str,
                  image_marker: str | None = None, tools: list[dict] | None = None) -> EncodedPrompt:
    """Sample -> EncodedPrompt: system prompt (and `tools`, an environment's), earlier turns, user turn with
    the images, videos and question (the images where the question's `image_marker`s are, else first)."""
    question = question_template.format(question=sample.question)
    messages = adapter.build_messages(question, len(sample.images), system_prompt, sample.history,
                                      image_marker, num_videos=len(sample.videos))
    return adapter.encode_prompt(messages, sample.images, sample.base_dir, name=f"sample {sample.id}",
                                 video_sources=sample.videos, tools=tools)
