"""Multi-turn episodes: an environment drives the sampler turn by turn, token-exact.

Turn 1 samples `n` completions of each prompt in one call (a GRPO group shares its prompt); from then on every
trajectory is its own prompt. After each assistant turn the environment replies, and its reply is rendered
once by the chat template (`adapter.encode_reply`) and appended to that trajectory's ids: turn k's prompt is
exactly turn k-1's prompt + the sampled ids + the reply's ids. History is never rendered or tokenised again,
so the trainer trains on the very ids the sampler produced, and the sampler is handed those same ids (with
every image of the trajectory so far) each turn. Sampled tokens carry their behavior logprobs and loss mask 1;
the environment's tokens (and its images' placeholders) are prompt: mask 0, logprob 0.

An episode ends when the environment says so (`stop`: a turn without a tool call is the answer), when a turn
hits rollout.max_new_tokens (`length`), after env.max_turns assistant turns (`max_turns`: the last turn's
reply comes from `env.last_step`, which runs no tool, since nothing would read its result), when the
trajectory reaches model.max_model_len (`context`: a turn the sampler cut at what was left of the context, or
a reply that would not leave room to sample; a reply is never cut, so never inside an image), or when a reply
would bring the trajectory over model.max_images_per_prompt images (`images`). An environment that raises (in
reset or step) or answers with something other than a `Reply` makes its sample a bad sample: its whole group
is dropped and named. A `Reply.reward` that is not a finite number fails the rollout's reward, as a reward
function's would (counted by reason, named, out of its group's baseline). A tool image the pixel policy cannot
use (a 1x4000 strip) becomes an error the model reads, counted as `tool_errors/bad_image`.
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
    env_reward_error: tuple[str, str] | None = None
    routed_experts: torch.Tensor | None = None  # [n - 1, layers, k]: every turn's routing (mixture of experts)
    last: Rollout | None = None  # the latest sampled turn
    finish: str | None = None
    versions: tuple[int, int] | None = None  # the policy versions of its turns: oldest start, newest end

    def add_turn(self, out: Rollout) -> None:
        self.versions = ((out.version, out.version_end) if self.versions is None
                         else (min(self.versions[0], out.version), max(self.versions[1], out.version_end)))
        if out.routed_experts is not None:
            # every turn's own routing: earlier rows as their turns recorded them, then this turn's rows of
            # the tokens after them (the last turn's final token, the reply, this turn's sampled tokens)
            done = 0 if self.routed_experts is None else len(self.routed_experts)
            self.routed_experts = (out.routed_experts if self.routed_experts is None
                                   else torch.cat([self.routed_experts, out.routed_experts[done:]]))
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
                             pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grids)
                             if grids else None,
                             videos=p.videos, pixel_values_videos=p.pixel_values_videos,
                             video_grid_thw=p.video_grid_thw,
                             max_new_tokens=max_model_len - len(ids), stop_token_ids=p.stop_token_ids)

    def rollout(self, tokenizer, image_token_id: int) -> Rollout:
        return Rollout(
            prompt=self.prompt, completion_ids=self.ids, logprobs=self.logprobs, finish_reason=self.finish,
            text=self.last.text, completion_mask=self.mask, group=self.group, env_images=self.images,
            env_pixel_values=torch.cat(self.pixel_values) if self.pixel_values else None,
            env_image_grid_thw=torch.cat(self.grids) if self.grids else None, turns=self.turns,
            tool_calls=self.tool_calls, tool_errors=self.tool_errors, env_reward=self.env_reward,
            env_reward_error=self.env_reward_error, routed_experts=self.routed_experts,
            transcript=transcript(tokenizer, self.ids, image_token_id),
            version=self.versions[0] if self.versions else 0, version_end=self.versions[1] if self.versions else 0,
        )


def transcript(tokenizer, ids: list[int], image_token_id: int) -> str:
    """The ids decoded with their special tokens, each image's placeholder run shown once with its length."""
    out, i = [], 0
    while i < len(ids):
        j = i
        same = ids[i] == image_token_id
        while j < len(ids) and (ids[j] == image_token_id) == same:
            j += 1
        out.append(f"<|image_pad|>x{j - i}" if same
                   else tokenizer.decode(ids[i:j], skip_special_tokens=False))
        i = j
    return "".join(out)


def turn_seed(seed: int, turn: int) -> int:
    """The sampler's seed for turn `turn` (0-based) of a call seeded `seed`."""
    return seed + 104_729 * turn


def run_episodes(env, adapter, sampler, prompts: list[EncodedPrompt], samples: list, n: int, seed: int, cfg
                 ) -> tuple[list[Rollout], list[tuple[Any, str]]]:
    """`n` trajectories of every prompt (`samples[g]` is prompt g's sample). Returns the rollouts
    (prompt-major, `group` = the prompt's index; the groups of bad samples left out) and the bad samples with
    their reasons."""
    from ..bounded import run_bounded
    from ..envs.environment import Reply
    from ..rewards.base import check_value

    bad: dict[int, str] = {}
    # an environment that stops each turn at its tool call: those tokens end a sample; its reply closes the
    # turn
    call_ends = set(adapter.tool_call_end_ids) if env.stop_at_tool_call else set()
    for p in prompts:
        p.stop_token_ids = sorted(call_ends)
        # the first turn's room too
        if cfg.model.max_model_len - len(p.input_ids) < cfg.rollout.max_new_tokens:
            p.max_new_tokens = cfg.model.max_model_len - len(p.input_ids)

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
        asked = []
        for ep in active:
            if ep.last.finish_reason == "length":  # cut below max_new_tokens: by what was left of the context
                cut = len(ep.last.completion_ids) >= cfg.rollout.max_new_tokens
                ep.finish = "length" if cut else "context"
            else:
                asked.append(ep)

        def reply_to(ep):  # at the turn budget no tool runs: nothing would read its result
            answer = env.last_step if ep.turns >= cfg.env.max_turns else env.step
            return lambda: answer(ep.sample, ep.state, ep.last.text)

        replies = run_bounded([reply_to(ep) for ep in asked], timeout)
        active = []
        for ep, (status, reply) in zip(asked, replies):
            if status != "ok":
                fail(ep.group, "step", reply if status == "raised" else f"no reply within {timeout:g} s")
                continue
            if not isinstance(reply, Reply):
                fail(ep.group, "step", f"it returned {reply!r:.60}, not a vlrl.envs.environment.Reply")
                continue
            ep.tool_calls += reply.tool_calls
            for reason, count in reply.tool_errors.items():
                ep.tool_errors[reason] = ep.tool_errors.get(reason, 0) + count
            if reply.reward is not None:
                value, reason = check_value(reply.reward)
                if reason is None:
                    ep.env_reward = (ep.env_reward or 0.0) + value
                elif ep.env_reward_error is None:
                    ep.env_reward_error = (reason, f"the environment's Reply.reward on turn {ep.turns} was "
                                                   f"{reply.reward!r:.80}")
            ep.finish = _budget(ep, reply, cfg)
            if ep.finish is not None:
                continue
            name = f"sample {ep.sample.id}, reply to turn {ep.turns}"
            try:
                encoded = adapter.encode_reply(reply.messages, reply.images, name=name,
                                               close_turn=ep.ids[-1] in call_ends)
            except UserError as e:
                messages, images = _usable_images(adapter, reply, name, ep.tool_errors)
                try:
                    if images is reply.images:  # every image usable: the reply itself cannot be rendered
                        raise e
                    encoded = adapter.encode_reply(messages, images, name=name,
                                                   close_turn=ep.ids[-1] in call_ends)
                except UserError as again:
                    fail(ep.group, "step (its reply cannot be rendered)", again)
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


def _usable_images(adapter, reply, name: str, errors: dict[str, int]) -> tuple[list[dict], list]:
    """The reply's messages and images, each image the pixel policy cannot use (a 1x4000 strip) replaced by
    the text of its error, which the model reads as the tool's result and `errors["bad_image"]` counts."""
    bad: dict[int, str] = {}
    for k, img in enumerate(reply.images):
        try:
            adapter.encode_reply([{"role": "tool", "content": [{"type": "image"}]}], [img],
                                 name=f"{name}, image {k + 1}")
        except UserError as e:  # "image <name>: 1x4000 cannot be used (...); crop or pad it"
            bad[k] = f"the tool returned an image that cannot be used: {str(e).split(': ', 1)[-1]}"
    if not bad:
        return reply.messages, reply.images
    errors["bad_image"] = errors.get("bad_image", 0) + len(bad)
    messages, k = [], 0
    for m in reply.messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    parts.append({"type": "text", "text": f"Error: {bad[k]}"} if k in bad else part)
                    k += 1
                else:
                    parts.append(part)
            m = {**m, "content": parts}
        messages.append(m)
    return messages, [img for k, img in enumerate(reply.images) if k not in bad]


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
