"""`vlrl check-batch`: build one real batch and prove it sound before any GPU hour is spent.

It loads the config and the model, rolls out one group for each of a few prompts with the configured
sampler, builds the training batch and checks: tensor shapes, image and video placeholders against their
grids, the token budget, that the loss mask covers exactly the sampled tokens, the M-RoPE positions against
the model's own, and that the trainer's logprobs of the sampled tokens agree with the sampler's (mismatch KL
and max abs diff), the check that catches every alignment bug.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .algo.losses import k3
from .batch import MultimodalBatch
from .config import Config
from .planner import packing_report, plan_step
from .records import Rollout
from .update import configure_policy

# Mismatch KL (k3, per token) allowed between trainer and sampler: float32 agrees to ~1e-12; bf16 kernels
# differ by a few 1e-4 on real models.
KL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False
    """Worth a look, but the batch is sound (it does not fail check-batch)."""


@dataclass
class Report:
    ok: bool = True
    checks: list[Check] = field(default_factory=list)
    shapes: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))
        self.ok = self.ok and bool(ok)

    def warn(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail, warning=True))

    def to_dict(self) -> dict:
        return asdict(self)


def mismatch_stats(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-token agreement of two [B, L] logprob tensors on `mask`: k3 KL(sampler || trainer) and max
    |diff|."""
    m = mask.bool()
    d = (trainer - sampler)[m].double()  # log(p_trainer / p_sampler) on sampled tokens
    if d.numel() == 0:
        return {"mismatch_kl": 0.0, "max_abs_diff": 0.0, "tokens": 0}
    return {"mismatch_kl": k3(d).mean().item(), "max_abs_diff": d.abs().max().item(),
            "tokens": int(d.numel())}


def check_routing_replay(batch: MultimodalBatch, policy, trainer_logprobs, stats: dict, report: Report) -> None:
    """Report how many tokens carry the sampler's routing and the mismatch KL with replay and without."""
    routed = batch.model_inputs.get("routed_experts")  # [B, L, layers, k]
    recorded = 0 if routed is None else int((routed >= 0).flatten(2).any(-1).sum())
    replay = policy.routing_replay
    policy.routing_replay = not replay
    other = mismatch_stats(trainer_logprobs()[0], batch.behavior_logprobs, batch.loss_mask)["mismatch_kl"]
    policy.routing_replay = replay
    with_kl, without_kl = (stats["mismatch_kl"], other) if replay else (other, stats["mismatch_kl"])
    report.stats.update(routing_recorded_tokens=recorded, mismatch_kl_with_replay=with_kl,
                        mismatch_kl_without_replay=without_kl, routing_replay=replay)
    detail = (f"{'on' if replay else 'off'}: {recorded}/{batch.real_tokens} tokens carry the sampler's "
              f"experts; mismatch KL {with_kl:.2e} with replay, {without_kl:.2e} without")
    if replay and not recorded:  # training still works, with the trainer's own routing
        report.warn("routing replay", detail + " (the sampler returned no routing: a vLLM server on the CPU "
                                               "cannot, see `vlrl serve`)")
    else:
        report.add("routing replay", True, detail)


def check_batch_structure(batch: MultimodalBatch, rollouts: list[Rollout], adapter, report: Report) -> None:
    B, L = batch.input_ids.shape
    shapes = {k: list(getattr(batch, k).shape)
              for k in ("input_ids", "attention_mask", "loss_mask", "behavior_logprobs")}
    shapes["advantages"] = list(batch.advantages.shape)
    shapes.update({k: list(v.shape) for k, v in batch.model_inputs.items()})
    report.shapes = shapes
    same = all(getattr(batch, k).shape == (B, L)
               for k in ("attention_mask", "loss_mask", "behavior_logprobs"))
    same = same and all(v.shape == (B, L) for k, v in batch.model_inputs.items()
                        if batch.layout[k] == "token")
    rows = {}
    for pixels, grid_key, patch, item in (("pixel_values", "image_grid_thw", "patch", "image"),
                                          ("pixel_values_videos", "video_grid_thw", "video_patch", "video")):
        pv, grid = batch.model_inputs.get(pixels), batch.model_inputs.get(grid_key)
        rows[pixels] = 0 if pv is None else pv.shape[0]
        same = same and rows[pixels] == sum(batch.rows_per_sample(patch))
        same = same and (0 if grid is None else grid.shape[0]) == sum(batch.rows_per_sample(item))
    videos = sum(batch.rows_per_sample("video"))
    report.add("shapes", same,
               f"[B, L] = [{B}, {L}]; pixel_values rows {rows['pixel_values']} = sum of per-sample "
               "patches"
               + (f"; pixel_values_videos rows {rows['pixel_values_videos']} likewise" if videos else ""))

    placeholders = (batch.input_ids == adapter.image_token_id).sum(-1).tolist()
    expected = [sum(adapter.placeholders_per_image(r.image_grid_thw)) for r in rollouts]
    report.add(
        "image tokens vs grid",
        placeholders == expected,
        f"{sum(placeholders)} <|image_pad|> tokens for {sum(batch.images_per_sample)} images "
        f"(t*h*w/{adapter.merge_size}^2 each); per sample {sorted(set(placeholders))}",
    )
    video_tokens = (batch.input_ids == adapter.video_token_id).sum(-1).tolist()
    frames = [len(v.frames) for r in rollouts for v in r.prompt.videos]
    report.stats.update(videos=videos, video_frames=sum(frames))
    if videos or sum(video_tokens):
        want = [sum(adapter.placeholders_per_image(r.prompt.video_grid_thw)) for r in rollouts]
        report.add(
            "video tokens vs grid",
            video_tokens == want,
            f"{sum(video_tokens)} <|video_pad|> tokens for {videos} videos of {sum(frames)} sampled frames "
            f"(t*h*w/{adapter.merge_size}^2 each, t = frame pairs); per sample {sorted(set(video_tokens))}",
        )

    prompt_lens = [len(r.prompt.input_ids) for r in rollouts]
    longest = int(batch.attention_mask.sum(-1).max())
    budget = adapter.cfg.max_model_len
    worst = max(prompt_lens) + report.stats["max_new_tokens"]
    report.stats.update(longest_prompt=max(prompt_lens), longest_sequence=longest, max_model_len=budget)
    report.add(
        "token budget",
        longest <= budget and worst <= budget,
        f"longest sequence {longest}, longest prompt {max(prompt_lens)} + max_new_tokens "
        f"{report.stats['max_new_tokens']} = {worst} <= max_model_len {budget}",
    )

    sampled = sum(sum(r.trained_mask) for r in rollouts)
    prompt_region = torch.zeros_like(batch.loss_mask)  # the prompt and every environment reply
    for i, (p, r) in enumerate(zip(prompt_lens, rollouts)):
        prompt_region[i, :p] = 1
        prompt_region[i, p : p
                      + len(r.completion_ids)] = 1 - torch.tensor(r.trained_mask, dtype=torch.float32)
    on_prompt = float((batch.loss_mask * prompt_region).sum())
    on_padding = float((batch.loss_mask * (1 - batch.attention_mask)).sum())
    placeholder = (batch.input_ids == adapter.image_token_id) | (batch.input_ids == adapter.video_token_id)
    on_images = float((batch.loss_mask * placeholder).sum())
    stray_logprobs = float((batch.behavior_logprobs * (1 - batch.loss_mask)).abs().sum())
    total = int(batch.attention_mask.sum())
    report.add(
        "loss mask",
        batch.num_loss_tokens == sampled and on_prompt == on_padding == on_images == stray_logprobs == 0,
        f"{batch.num_loss_tokens} trained tokens = {sampled} sampled; 0 on "
        "prompt/environment/image/video/padding "
        f"({batch.num_loss_tokens / max(total, 1):.1%} of {total} tokens)",
    )
    banned = sum(1 for r in rollouts for t, m in zip(r.completion_ids, r.trained_mask)
                 if m and t in adapter.banned_token_ids)
    report.add("no sampled placeholders", banned == 0,
               f"{banned} image/video placeholder tokens in completions")


def sum_counts(counts) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


TRUNCATION_WARNING = 0.5  # share of turns cut by max_new_tokens above which check-batch warns


def check_truncation(rollouts: list[Rollout], cfg: Config, report: Report) -> None:
    """A warning when most samples were cut by rollout.max_new_tokens: the rewards then score unfinished
    answers (and a tool call cut in the middle never runs): raise max_new_tokens."""
    cut = sum(r.finish_reason == "length" for r in rollouts)
    report.stats["truncated_fraction"] = cut / len(rollouts)
    if cut / len(rollouts) > TRUNCATION_WARNING:
        report.warn("truncation", f"{cut} of {len(rollouts)} samples were cut by rollout.max_new_tokens "
                    f"({cfg.rollout.max_new_tokens}): rewards score unfinished answers and a cut tool call "
                    "never runs; raise rollout.max_new_tokens")


def check_positions(batch: MultimodalBatch, adapter, model, report: Report) -> None:
    """The M-RoPE positions vlrl builds with the batch against the model's own (`get_rope_index`, what it
    would compute in the forward): a transformers whose position rules changed is caught here."""
    ours = batch.model_inputs.get("position_ids")
    if ours is None:
        return
    theirs = adapter.reference_positions(model, batch)
    real = batch.attention_mask.bool().expand_as(ours)
    differ = int((ours != theirs.to(ours.device))[real].sum())
    report.add("M-RoPE positions", differ == 0,
               f"{differ} of {int(real.sum())} (token, axis) positions differ from the model's own "
               "get_rope_index")


def render_sample(rollout: Rollout, adapter) -> tuple[str, list[tuple[str, str]]]:
    """The sample as (plain text with [[sampled]] marks, [(piece, kind)] spans). Kinds: `prompt`, `sampled`
    (trained), `env` (an environment's reply: prompt to the policy, never trained), `image` (a run of image
    placeholders, shown once with its length and named: the prompt's images, then the environment's) and
    `video` (a run of video placeholders: a pair of frames, after its timestamp)."""
    tok, pad, vpad = adapter.tokenizer, adapter.image_token_id, adapter.video_token_id
    p = len(rollout.prompt.input_ids)
    ids = rollout.prompt.input_ids + rollout.completion_ids
    kinds = ["prompt"] * p + ["sampled" if m else "env" for m in rollout.trained_mask]
    kinds = ["image" if t == pad else "video" if t == vpad else k for t, k in zip(ids, kinds)]
    prompt_images = len(rollout.prompt.images)
    spans: list[tuple[str, str]] = []
    images = i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and kinds[j] == kinds[i]:
            j += 1
        if kinds[i] == "image":
            images += 1
            name = f"image {images}" if images <= prompt_images else f"tool image {images - prompt_images}"
            spans.append((f"<|image_pad|>x{j - i} ({name})", "image"))
        elif kinds[i] == "video":
            spans.append((f"<|video_pad|>x{j - i}", "video"))
        else:
            spans.append((tok.decode(ids[i:j]), kinds[i]))
        i = j
    plain = "".join(f"[[{text}]]" if kind == "sampled" else text for text, kind in spans)
    return plain, spans


def run_check_batch(cfg: Config, num_prompts: int = 2, progress=None) -> tuple[Report, list[tuple[str, str]]]:
    from .adapters import load_adapter
    from .batch import batch_logprobs
    from .data.sources import load_samples
    from .errors import UserError
    from .rollout import make_sampler
    from .rollout.groups import RolloutGroups
    from .runtime import quiet_libraries, resolve_device, resolve_dtype

    quiet_libraries()
    step = progress or (lambda msg: None)
    report = Report()
    report.stats["max_new_tokens"] = cfg.rollout.max_new_tokens
    device = resolve_device()
    dtype = resolve_dtype(cfg, device)
    step(f"loading {cfg.model.path} ({dtype}, {device})")
    adapter = load_adapter(cfg.model)
    model = adapter.load_model(dtype, device)
    samples = load_samples(cfg.env, "train", cfg.train.seed)[:num_prompts]
    sampler = make_sampler(cfg, model, adapter)
    step(f"rolling out {len(samples)} prompts x {cfg.rollout.group_size} samples")
    rollout_groups = RolloutGroups(cfg, adapter, sampler)
    try:
        got = rollout_groups.score_groups(samples, cfg.rollout.group_size, cfg.rollout.seed)
    finally:
        rollout_groups.close()
    report.stats["bad_samples"] = [{"sample_id": s.id, "reason": r} for s, r in got.bad_samples]
    if not got.rollouts:
        raise UserError(f"none of the first {num_prompts} samples could be used; first reason: "
                        f"{got.bad_samples[0][1]}")
    rollouts = got.rollouts
    batch = adapter.build_batch(rollouts)
    # every request the server answered (one per prompt, then one per later turn of every trajectory, those of
    # samples the environment dropped afterwards included) has its prompt ids checked
    checked = getattr(sampler, "prompts_checked", None)
    if checked is None:
        report.add("prompt ids: trainer == sampler", True,
                   "the embedded sampler generates from the processor's ids")
    else:
        requests, differed = sampler.requests, sampler.prompt_mismatches
        report.add("prompt ids: trainer == sampler", differed == 0 and checked == requests,
                   f"{checked}/{requests} requests (every turn's) checked, {differed} differed: the server's "
                   "prompt_token_ids "
                   + ("equal the trainer's" if differed == 0 else "differ from the trainer's"))
    check_batch_structure(batch, rollouts, adapter, report)
    check_positions(batch, adapter, model, report)

    step("recomputing the sampled tokens' logprobs with the trainer")
    policy = adapter.policy(model, cfg.rollout.temperature).eval()
    _, plan = plan_step(rollouts, [], lambda _: batch, cfg.train, adapter.packing_unavailable(model))
    groups = plan.micro_batches
    packing = report.stats["packing"] = packing_report(batch, plan, cfg.train)
    report.add(
        "packing",
        True,
        (f"packed: {packing['micro_batches']} micro-batches of {packing['tokens_per_micro_batch']} tokens; "
         f"padding {packing['padding_before']:.0%} (padded, in order) -> {packing['padding_after']:.0%}"
         + (f" (within train.micro_batch_tokens = {cfg.train.micro_batch_tokens}; on a GPU, checkpoint_fraction "
            '= "auto" halves it at the first update where that spares layers recomputed whole)'
            if cfg.train.checkpoint_fraction == "auto" and cfg.train.micro_batch_tokens else ""))
        if plan.packed
        else f"padded micro-batches ({plan.reason or 'train.packing = false'}); padding "
             f"{packing['padding_after']:.0%}",
    )
    configure_policy(policy, cfg.algorithm)  # (mixture of experts: routing replay as the update does it)

    def trainer_logprobs():
        lps, ents = torch.zeros_like(batch.loss_mask), torch.zeros_like(batch.loss_mask)
        with torch.no_grad():
            for g in groups:
                mb = plan.micro_batch(batch, g).to(device)
                lp, ent = batch_logprobs(policy, mb)
                lps[g, : mb.seq_len] = lp.cpu()
                ents[g, : mb.seq_len] = ent.cpu()
        return lps, ents

    trainer_lp, entropy = trainer_logprobs()
    stats = mismatch_stats(trainer_lp, batch.behavior_logprobs, batch.loss_mask)
    if hasattr(policy, "routing_replay"):  # a mixture-of-experts policy: the mismatch with and without replay
        check_routing_replay(batch, policy, trainer_logprobs, stats, report)
    tol = KL_TOLERANCE[dtype]
    report.stats.update(stats)
    report.stats.update(
        micro_batches=len(groups),
        entropy=float((entropy * batch.loss_mask).sum() / max(batch.num_loss_tokens, 1)),
        response_length=sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        truncated=sum(r.finish_reason == "length" for r in rollouts),
        samples=len(rollouts),
        reward_mean=sum(r.reward for r in got.trained) / max(len(got.trained), 1),
        reward_failures=sum(got.failures.values()),
        max_turns=max(r.turns for r in rollouts),
        env_images=sum(len(r.env_images) for r in rollouts),
        tool_calls=sum(r.tool_calls for r in rollouts),
        tool_errors=sum_counts(r.tool_errors for r in rollouts),
        sampler="embedded" if not cfg.rollout.server_url else f"vllm {cfg.rollout.server_url}",
    )
    check_truncation(rollouts, cfg, report)
    if rollout_groups.env is not None:
        errors = report.stats["tool_errors"]
        report.add("tools", True,
                   f"{report.stats['tool_calls']} tool calls ({sum(errors.values())} failed"
                   + "".join(f", {n} {reason}" for reason, n in sorted(errors.items()))
                   + f"), {report.stats['env_images']} tool images, at most {report.stats['max_turns']} "
                     "turns in "
                   f"{len(rollouts)} episodes (sampler: {report.stats['sampler']})")
    renormalised = cfg.rollout.top_p < 1 or cfg.rollout.top_k >= 0
    note = " (top_p/top_k renormalise the sampler)" if renormalised else ""
    if cfg.rollout.server_url and stats["mismatch_kl"] > tol:
        note += "; does the server serve model.path's weights? (a training run leaves its own on the server)"
    report.add(
        "trainer vs sampler logprobs",
        stats["mismatch_kl"] <= tol,
        f"mismatch KL {stats['mismatch_kl']:.2e} (tolerance {tol:.0e} for "
        f"{str(dtype).removeprefix('torch.')}), "
        f"max |diff| {stats['max_abs_diff']:.2e} over {stats['tokens']} tokens{note}",
    )
    shown = max(rollouts, key=lambda r: r.turns)  # the longest trajectory (multi-turn): the most to see
    plain, spans = render_sample(shown, adapter)
    report.sample = {"text": plain, "images": shown.prompt.image_refs, "videos": shown.prompt.video_refs,
                     "env_images": len(shown.env_images), "turns": shown.turns,
                     "finish_reason": shown.finish_reason}
    return report, spans


def print_report(console, report: Report, spans: list[tuple[str, str]]) -> None:
    from rich.table import Table
    from rich.text import Text

    shapes = Table(title="batch", show_header=True, header_style="bold")
    shapes.add_column("tensor")
    shapes.add_column("shape", justify="right")
    for name, shape in report.shapes.items():
        shapes.add_row(name, str(shape))
    console.print(shapes)

    checks = Table(title="checks", show_header=True, header_style="bold")
    checks.add_column("")
    checks.add_column("check")
    checks.add_column("detail")
    for c in report.checks:
        checks.add_row("[yellow]warn[/]" if c.warning else "[green]ok[/]" if c.ok else "[bold red]FAIL[/]",
                       c.name,
                       c.detail)
    console.print(checks)

    skipped = report.stats.get("bad_samples") or []
    if skipped:
        bad = Table(title=f"skipped samples: {len(skipped)} (env.on_bad_sample = \"skip\")",
                    header_style="bold")
        bad.add_column("sample")
        bad.add_column("reason")
        for b in skipped:
            bad.add_row(str(b["sample_id"]), b["reason"])
        console.print(bad)

    text = Text()
    styles = {"sampled": "bold black on green", "image": "cyan", "video": "cyan", "env": "dim italic",
              "prompt": "dim"}
    for piece, kind in spans:
        text.append(piece, style=styles[kind])
    sample = report.sample
    turns = f"{sample['turns']} turns, {sample['env_images']} tool images; environment turns dimmed; " \
        if sample.get("turns", 1) > 1 else ""
    videos = f"videos: {', '.join(sample['videos'])}; " if sample.get("videos") else ""
    console.print(f"[bold]sample[/] (images: {', '.join(sample['images']) or 'none'}; {videos}{turns}"
                  f"trained tokens highlighted; finish: {sample['finish_reason']})")
    console.print(text)
    verdict = "[bold green]batch OK[/]" if report.ok else "[bold red]batch FAILED[/]"
    note = f"; {len(skipped)} sample(s) skipped (table above)" if skipped else ""
    warnings = [c.name for c in report.checks if c.warning]
    note += f"; warnings: {', '.join(warnings)} (table above)" if warnings else ""
    console.print(f"{verdict}: mismatch KL {report.stats['mismatch_kl']:.2e}, max |diff| "
                  f"{report.stats['max_abs_diff']:.2e}{note}")
