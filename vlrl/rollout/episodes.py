"""Multi-turn episodes: an environment drives the sampler turn by turn, token-exact.

Turn 1 samples `n` completions of each prompt in one call (a GRPO group shares its prompt); from then on every
trajectory is its own prompt. After each assistant turn the environment replies, and its reply is rendered
once by the chat template (`adapter.encode_reply`) and appended to that trajectory's ids: turn k's prompt is
exactly turn k-1's prompt + the sampled ids + the reply's ids. History is never rendered or tokenised again,
so the trainer trains on the very ids the sampler produced, and the sampler is handed those same ids (with
every image of the trajectory so far) each turn. Sampled tokens carry their behavior logprobs and loss mask 1;
the environment's tokens (and its images' placeholders) are prompt: mask 0, logprob 0.

An episode ends when the environment says so (`stop`: a turn without a tool call is the answer), when a turn
hits max_new_tokens (`length`), after env.max_turns assistant turns (`max_turns`), when the next reply would not
leave room to sample within model.max_model_len (`context`: a reply is never cut, so never inside an image),
or when it would bring the trajectory over model.max_images_per_prompt images (`images`). An environment that
raises (in reset or step) makes its sample a bad sample: its whole group is dropped and named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from ..records import EncodedPrompt, Rollout

STEP_TIMEOUT = 4  # an environment's `step` may run this many tool timeouts (its calls run one after another)


@dataclass
class _Episode:
    group: int
    sample: Any
    state: Any
    prompt: EncodedPrompt
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    images: list = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    grids: list[torch.Tensor] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    env_reward: float | None = None
    last: Rollout | None = None  # the latest sampled turn
    finish: str | None = None

    def add_turn(self, out: Rollout) -> None:
        self.ids += out.completion_ids
        self.mask += [1] * len(out.completion_ids)
        self.logprobs += out.logprobs
        self.turns += 1
        self.last = out

    def add_reply(self, reply) -> None:
        self.ids += reply.input_ids
        self.mask += [0] * len(reply.input_ids)
        self.logprobs += [0.0] * len(reply.input_ids)
        if reply.image_grid_thw is not None:
            self.images += reply.images
            self.pixel_values.append(reply.pixel_values)
            self.grids.append(reply.image_grid_thw)

    def continuation(self, max_model_len: int) -> EncodedPrompt:
        """The next turn's prompt: every id and image so far; the sampler takes it by its ids."""
        p = self.prompt
        ids = p.input_ids + self.ids
        pv = [t for t in [p.pixel_values, *self.pixel_values] if t is not None]
        grids = [t for t in [p.image_grid_thw, *self.grids] if t is not None]
        return EncodedPrompt(input_ids=ids, messages=None, images=p.images + self.images,
                             pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grids) if grids else None,
                             videos=p.videos, pixel_values_videos=p.pixel_values_videos, video_grid_thw=p.video_grid_thw,
                             max_new_tokens=max_model_len - len(ids), stop_token_ids=p.stop_token_ids)

    def rollout(self, tokenizer, image_token_id: int) -> Rollout:
        return Rollout(
            prompt=self.prompt, completion_ids=self.ids, logprobs=self.logprobs, finish_reason=self.finish,
            text=self.last.text, completion_mask=self.mask, group=self.group, env_images=self.images,
            env_pixel_values=torch.cat(self.pixel_values) if self.pixel_values else None,
            env_image_grid_thw=torch.cat(self.grids) if self.grids else None, turns=self.turns,
            tool_calls=self.tool_calls, tool_errors=self.tool_errors, env_reward=self.env_reward,
            transcript=transcript(tokenizer, self.ids, image_token_id),
        )


def transcript(tokenizer, ids: list[int], image_token_id: int) -> str:
    """The ids decoded with their special tokens, each image's placeholder run shown once with its length."""
    out, i = [], 0
    while i < len(ids):
        j = i
        same = ids[i] == image_token_id
        while j < len(ids) and (ids[j] == image_token_id) == same:
            j += 1
        out.append(f"<|image_pad|>x{j - i}" if same else tokenizer.decode(ids[i:j], skip_special_tokens=False))
        i = j
    return "".join(out)


def turn_seed(seed: int, turn: int) -> int:
    """The sampler's seed for turn `turn` (0-based) of a call seeded `seed`."""
    return seed + 104_729 * turn


def run_episodes(env, adapter, sampler, prompts: list[EncodedPrompt], samples: list, n: int, seed: int, cfg
                 ) -> tuple[list[Rollout], list[tuple[Any, str]]]:
    """`n` trajectories of every prompt (`samples[g]` is prompt g's sample). Returns the rollouts (prompt-major,
    `group` = the prompt's index; the groups of bad samples left out) and the bad samples with their reasons."""
    from ..envs.rewards import run_bounded

    bad: dict[int, str] = {}
    # an environment that stops each turn at its tool call: those tokens end a sample; its reply closes the turn
    call_ends = set(adapter.tool_call_end_ids) if env.stop_at_tool_call else set()
    for p in prompts:
        p.stop_token_ids = sorted(call_ends)

    def fail(group: int, where: str, error: BaseException | str) -> None:
        what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        reason = f"sample {samples[group].id}: the environment failed in {where} ({what})"
        if cfg.env.on_bad_sample == "error":
            raise UserError(f"{reason} (to skip such samples and go on, set env.on_bad_sample = \"skip\")")
        bad.setdefault(group, reason)

    episodes: list[_Episode] = []
    for g, sample in enumerate(samples):
        try:
            episodes += [_Episode(g, sample, env.reset(sample), prompts[g]) for _ in range(n)]
        except Exception as e:  # noqa: BLE001 - the user's environment may raise anything
            fail(g, "reset", e)
    starts = [g for g in range(len(samples)) if g not in bad]
    outs = sampler.sample([prompts[g] for g in starts], n, seed=seed) if starts else []
    active, turn = episodes, 0
    while active:
        for ep, out in zip(active, outs):
            ep.add_turn(out)
        timeout = STEP_TIMEOUT * env.tool_timeout_s
        asked = [ep for ep in active if ep.last.finish_reason != "length"]
        for ep in active:
            if ep.last.finish_reason == "length":
                ep.finish = "length"
        replies = run_bounded([lambda ep=ep: env.step(ep.sample, ep.state, ep.last.text) for ep in asked], timeout)
        active = []
        for ep, (status, reply) in zip(asked, replies):
            if status != "ok":
                fail(ep.group, "step", reply if status == "raised" else f"no reply within {timeout:g} s")
                continue
            ep.tool_calls += reply.tool_calls
            for reason, count in reply.tool_errors.items():
                ep.tool_errors[reason] = ep.tool_errors.get(reason, 0) + count
            if reply.reward is not None:
                ep.env_reward = (ep.env_reward or 0.0) + float(reply.reward)
            ep.finish = _budget(ep, reply, cfg)
            if ep.finish is not None:
                continue
            try:
                encoded = adapter.encode_reply(reply.messages, reply.images,
                                               name=f"sample {ep.sample.id}, reply to turn {ep.turns}",
                                               close_turn=ep.ids[-1] in call_ends)
            except UserError as e:
                fail(ep.group, "step (its reply cannot be rendered)", e)
                continue
            if len(ep.prompt.input_ids) + len(ep.ids) + len(encoded.input_ids) >= cfg.model.max_model_len:
                ep.finish = "context"
                continue
            ep.add_reply(encoded)
            active.append(ep)
        active = [ep for ep in active if ep.group not in bad]
        if active:
            turn += 1
            outs = sampler.sample([ep.continuation(cfg.model.max_model_len) for ep in active], 1,
                                  seed=turn_seed(seed, turn))
    done = [ep for ep in episodes if ep.group not in bad]
    tok, pad = adapter.tokenizer, adapter.image_token_id
    return [ep.rollout(tok, pad) for ep in done], [(samples[g], reason) for g, reason in bad.items()]


def _budget(ep: _Episode, reply, cfg) -> str | None:
    """Why the episode ends after this reply, or None when it goes on."""
    if reply.done:
        return "stop"
    if ep.turns >= cfg.env.max_turns:
        return "max_turns"
    images = len(ep.prompt.images) + len(ep.images) + len(reply.images)
    if images > cfg.model.max_images_per_prompt:
        return "images"
    return None
