"""Policy update and logprob pass: vlrl's real path beside the naive HF path, on the same batch, one process.

Default shapes are the baseline's (ENVIRONMENT.md): Qwen3-VL-8B architecture with random bf16 weights, sdpa,
8 samples x 1041 tokens (one 448x448 image = 196 image tokens, 768 completion tokens), then a long case
(8 x 4096 tokens, 4 images each). For each path it prints tokens/s, MFU (6N rule for an update, 2N for a
forward, N = language-model parameters without the input embedding, 989 TFLOP/s dense bf16), peak memory,
the ratios against the naive path, and how far the fast path's logprobs and gradients are from the naive
path's. `--max-tokens` also searches the largest micro-batch each path fits in GPU memory.

    python bench/update_step.py                # on a GPU: the 8B shapes
    python bench/update_step.py --tiny         # the same comparison on the tiny model, on the CPU (< 1 min)
    python bench/update_step.py --family qwen3-vl-moe --layers 12 --images 0 --long "" --group 1
                                               # Qwen3-VL-30B-A3B cut to 12 layers: naive eager and grouped_mm
                                               # experts beside vlrl's path, then the ragged case (README)
    python bench/update_step.py --compile --fractions 0.75 --ragged-only   # the ragged GRPO case only
    python bench/update_step.py --compile --auto --optimizer --auto-only --memory-caps 0 74.5
                                               # `auto` checkpointing on the ragged batch as shipped (+ AdamW),
                                               # AdamW's moments offloaded where `auto` keeps them
                                               # (--offload-optimizer), the token budget halved where it
                                               # spares layers recomputed whole

Then the ragged case (`bench/ragged.py`): a GRPO step of ragged completions updated padded (today's path, and
length-sorted) and packed (each attention route), and the line `ragged update: packed vs padded ...`.

The naive path is what most RL code does: `model(**inputs).logits` for every position, a float32
log_softmax over the full vocabulary, gather, loss, backward, with gradient checkpointing and every
parameter trainable. vlrl's path is `Qwen3VLPolicy` (backbone + chunked logprobs at trained positions only)
with `accumulate_gradients` and the loss of a real step, vision tower frozen (the default).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpointing  # noqa: E402  (bench/checkpointing.py, beside this script)
import ragged  # noqa: E402  (bench/ragged.py, beside this script)

from vlrl.adapters import moe_experts  # noqa: E402
from vlrl.adapters.fast_vision import set_fast_vision  # noqa: E402
from vlrl.adapters.linear_attention import has_linear_attention, set_delta_rule  # noqa: E402
from vlrl.adapters.patches import patch_model  # noqa: E402
from vlrl.adapters.qwen3_vl import Qwen3VLAdapter  # noqa: E402
from vlrl.config import AlgorithmConfig, ModelConfig  # noqa: E402
from vlrl.records import EncodedPrompt, Rollout  # noqa: E402
from vlrl.update import accumulate_gradients  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, PAD, IM_END = 151655, 151656, 151652, 151653, 151643, 151645


def qwen3_vl_8b_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                 mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )


def qwen3_vl_30b_a3b_config(layers: int | None = None):
    """Qwen3-VL-30B-A3B's architecture (mixture of experts: 128 experts of 768, 8 routed per token), cut to
    `layers` of its 48 decoder layers (12 fit one H200 with the naive path's full logits)."""
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers or 48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=False, moe_intermediate_size=768, num_experts=128,
            num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                 mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )


def qwen3_5_9b_config():
    """Qwen3.5-9B's architecture: transformers' Qwen3_5Config defaults (32 layers, 3 of 4 Gated DeltaNet, hidden
    4096, 16 query / 4 kv heads of 256, partial M-RoPE, vocab 248,320), its vision tower's output widened to
    the text hidden size."""
    from transformers import Qwen3_5Config

    cfg = Qwen3_5Config(vision_config=dict(out_hidden_size=4096))
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = False
    return cfg


class _Tokens:
    """The few token facts the adapter reads, for a model whose tokenizer is not on this machine."""

    def __init__(self, ids: dict[str, int], pad: int):
        self.ids, self.pad_token_id, self.unk_token_id = ids, pad, None

    def convert_tokens_to_ids(self, t):
        return self.ids.get(t)

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def bench_adapter(image_id, video_id, pad, eos, max_model_len, min_pixels=64 * 32 * 32, max_pixels=2048 * 32 * 32,
                  family="qwen3-vl"):
    toks = _Tokens({"<|image_pad|>": image_id, "<|video_pad|>": video_id, "<|im_end|>": eos, "<|endoftext|>": pad}, pad)
    proc = SimpleNamespace(tokenizer=toks, image_processor=SimpleNamespace(patch_size=16, merge_size=2))
    cls = Qwen3VLAdapter
    if family == "qwen3-vl-moe":
        from vlrl.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter as cls
    return cls(proc, ModelConfig(path="(bench)", max_model_len=max_model_len, min_pixels=min_pixels,
                                 max_pixels=max_pixels))


def make_rollouts(adapter, batch, seq_len, images, image_side, completion, vocab, seed=0, group=1):
    """Synthetic rollouts of exact shapes: text, then `images` images of image_side^2 pixels, then text,
    then `completion` sampled tokens. Random ids avoid the special tokens. With `group` > 1, consecutive
    samples share their prompt (text and images), as the rollouts of one GRPO group do."""
    g = torch.Generator().manual_seed(seed)
    grid = image_side // 16
    top = min(vocab - 8, 150000, adapter.image_token_id - 5)  # text ids: below every special token
    per_image = grid * grid // 4
    rollouts = []
    for i in range(batch):
        if i % group:
            comp = torch.randint(0, top, (completion,), generator=g).tolist()
            lps = (-torch.rand(completion, generator=g) * 3).tolist()
            rollouts.append(Rollout(prompt=rollouts[-1].prompt, completion_ids=comp, logprobs=lps,
                                    finish_reason="length", advantage=float(torch.randn(1, generator=g))))
            continue
        prompt_len = seq_len - completion
        text = prompt_len - images * (per_image + 2)
        assert text >= 2, "sequence too short for its images"
        ids = torch.randint(0, top, (text,), generator=g).tolist()
        body = ids[: text // 2]
        for _ in range(images):
            body += [VISION_START if vocab > 150000 else adapter.image_token_id - 2] + [adapter.image_token_id] * per_image
            body += [VISION_END if vocab > 150000 else adapter.image_token_id - 1]
        body += ids[text // 2 :]
        pv = torch.randn(images * grid * grid, 1536, generator=g) if images else None
        thw = torch.tensor([[1, grid, grid]] * images) if images else None
        prompt = EncodedPrompt(input_ids=body, messages=[], images=[], pixel_values=pv, image_grid_thw=thw)
        comp = torch.randint(0, top, (completion,), generator=g).tolist()
        lps = (-torch.rand(completion, generator=g) * 3).tolist()
        rollouts.append(Rollout(prompt=prompt, completion_ids=comp, logprobs=lps, finish_reason="length",
                                advantage=float(torch.randn(1, generator=g))))
    return rollouts


@contextmanager
def transformers_defaults(model, matmul_patch_embed=False):
    """The naive path runs transformers' own code: every image copy encoded, its own vision attention (also
    when checkpointed blocks recompute in the backward: keep the whole update inside), its own positions.
    `matmul_patch_embed`: keep vlrl's patch embedding (for the exactness check: in bf16 the convolution and
    the matmul round differently, and a random tower amplifies that to ~1.5% of its features)."""
    from vlrl.adapters.shared_images import set_image_sharing

    set_image_sharing(model.model.visual, False)
    set_fast_vision(model.model.visual, False, patch_embed_as_matmul=matmul_patch_embed)
    linear = getattr(model, "_bench_delta_rule", None)
    if linear:  # (Qwen3.5) transformers' PyTorch fallbacks, as without flash-linear-attention
        set_delta_rule(model.model.language_model, "torch")
    try:
        yield
    finally:
        set_image_sharing(model.model.visual, True)
        set_fast_vision(model.model.visual, True)
        if linear:
            set_delta_rule(model.model.language_model, linear)


def naive_logprobs(model, batch, banned, temperature=1.0):
    """The naive path: full [B, L, V] logits, float32 log_softmax over the vocabulary, gather. (The sampler's
    placeholder ban is applied too, so both paths compute the same function.) The model computes its M-RoPE
    positions itself; run it inside `transformers_defaults` for the rest of transformers' defaults."""
    inputs = {k: v for k, v in batch.model_inputs.items() if k != "position_ids"}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **inputs)
    logits = out.logits.float() / temperature  # [B, L, V]
    logits[..., banned] = float("-inf")
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
    lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)  # [B, L]
    return torch.where(batch.loss_mask.bool(), lp, 0.0)  # (prompt image tokens are banned targets: -inf there)


def naive_update(model, batch, settings, max_new_tokens, banned, matmul_patch_embed=False):
    from vlrl.algo.losses import aggregation_weights, policy_loss

    with transformers_defaults(model, matmul_patch_embed):
        logp = naive_logprobs(model, batch, banned)
        tok, _ = policy_loss(logp, batch.behavior_logprobs, batch.advantages, batch.loss_mask, settings)
        w = aggregation_weights(batch.loss_mask, settings.aggregation, float(batch.loss_mask.sum()),
                                float((batch.loss_mask.sum(-1) > 0).sum()), max_new_tokens)
        (tok * w).sum().backward()
    return logp.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_gib(device, fn):
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def set_trainable(model, vision: bool, checkpointing: bool, fraction: float = 1.0):
    from vlrl.adapters.qwen3_vl import set_checkpointing

    model.requires_grad_(True)
    if not vision:
        model.model.visual.requires_grad_(False)
    if checkpointing:
        set_checkpointing(model, fraction)
    else:
        model.gradient_checkpointing_disable()
    model.train()


CHECKED = ("lm_head", "layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.17.self_attn.o_proj",
           "layers.35.mlp.gate_proj", "language_model.norm", "embed_tokens",
           # Qwen3.5: a Gated DeltaNet layer's projections, conv and decay parameters, a full-attention layer
           "layers.0.linear_attn", "layers.3.self_attn.q_proj", "layers.30.linear_attn.in_proj_qkv")


def grads_of(model, every: bool):
    """Gradients to compare, copied to the CPU (all of them on the tiny model; a spread of layers on 8B)."""
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
            if p.grad is not None and (every or any(c in n for c in CHECKED))}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def shared_vision_error(model, batch) -> float:
    """Relative difference of the vision features with repeated images encoded once vs every copy encoded
    (0 when no image repeats; in bf16, a smaller matmul may round differently)."""
    from vlrl.adapters.shared_images import set_image_sharing

    if "pixel_values" not in batch.model_inputs:
        return 0.0
    feats = []
    with torch.no_grad():
        for shared in (False, True):
            set_image_sharing(model.model.visual, shared)
            out = model.model.visual(batch.model_inputs["pixel_values"], grid_thw=batch.model_inputs["image_grid_thw"],
                                     return_dict=True)
            feats.append(out.pooler_output.float())
    return rel_err(feats[1], feats[0])


def patch_embed_errors(model, batch) -> tuple[float, float]:
    """How far the vision features are from a float32 copy of the tower (transformers' own path), with
    transformers' convolution patch embedding and with vlrl's matmul: (conv, matmul). Equal errors mean the
    matmul costs no accuracy; their size is what bf16 does to this tower."""
    import copy

    if "pixel_values" not in batch.model_inputs:
        return 0.0, 0.0
    pv, grid = batch.model_inputs["pixel_values"], batch.model_inputs["image_grid_thw"]
    visual = model.model.visual
    reference = copy.deepcopy(visual).float()
    set_fast_vision(reference, False)
    out = []
    with torch.no_grad():
        want = reference(pv.float(), grid_thw=grid, return_dict=True).pooler_output
        del reference
        for matmul in (False, True):
            set_fast_vision(visual, True, patch_embed_as_matmul=matmul)
            got = visual(pv.to(visual.dtype), grid_thw=grid, return_dict=True).pooler_output
            out.append(rel_err(got.float(), want))
    set_fast_vision(visual, True)
    if not hasattr(visual, "_vlrl_fast_vision"):  # --host-syncs: no matmul patch embedding to measure
        return out[0], math.nan
    return out[0], out[1]


def non_embedding_params(model):
    """Language-model parameters without the input embedding; of a mixture of experts, the active ones (each
    token computes top_k of num_experts experts: Qwen3-VL-30B-A3B cut to 12 layers, 0.99B)."""
    text = model.config.text_config
    share = getattr(text, "num_experts_per_tok", 1) / getattr(text, "num_experts", 1)
    return sum(p.numel() * (share if ".experts." in n else 1.0) for n, p in model.named_parameters()
               if "visual" not in n and "embed_tokens" not in n)


@contextmanager
def experts(model, implementation: str | None):
    """Within the block, the model's experts compute with `implementation` (None: as they are)."""
    if implementation is None or not hasattr(model.config.text_config, "num_experts"):
        yield
        return
    text = model.config.text_config
    before = text._experts_implementation
    text._experts_implementation = implementation
    try:
        yield
    finally:
        text._experts_implementation = before


def profile(fn, model, device, rows=18):
    """The CUDA kernels that take the time of one call of `fn` (after a warm-up), by own time."""
    set_trainable(model, vision=False, checkpointing=True)
    ragged.kernel_table(fn, sync, device, rows)


def breakdown(fn, model, device, label):
    """Where one call of `fn` spends its time, on the GPU's clock (CUDA events recorded as the host reaches
    each boundary) and on the host's: before the vision tower, the tower, between the tower and the language
    model (feature merge, M-RoPE positions), the language model, after it (the logprob head). A GPU span
    longer than its kernels is the GPU waiting for the host."""
    marks = []

    def mark(name):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((name, ev, time.perf_counter()))

    hooks = []
    gc.collect()
    torch.cuda.empty_cache()
    for part in ("visual", "language_model"):
        mod = getattr(model.model, part)
        hooks.append(mod.register_forward_pre_hook(lambda *a, p=part: mark(f"{p} start")))
        hooks.append(mod.register_forward_hook(lambda *a, p=part: mark(f"{p} end")))
    try:
        fn()  # warm
        sync(device)
        marks.clear()
        mark("call")
        fn()
        mark("return")
        sync(device)
    except torch.OutOfMemoryError:
        print(f"  breakdown, {label}: OOM", flush=True)
        return
    finally:
        for h in hooks:
            h.remove()
    cells = []
    for (n0, e0, t0), (n1, e1, t1) in zip(marks, marks[1:]):
        span = {"visual end": "vision tower", "language_model end": "language model"}.get(n1, f"{n0} -> {n1}")
        cells.append(f"{span} {e0.elapsed_time(e1):.1f} ms (host {1e3 * (t1 - t0):.1f})")
    print(f"  breakdown, {label}: " + "; ".join(cells), flush=True)


def run_case(name, model, adapter, rollouts, device, args, settings, results):
    batch = adapter.build_batch(rollouts).to(device)
    if args.host_syncs:  # transformers computes M-RoPE positions in the forward, as it does by default
        batch.model_inputs.pop("position_ids")
    tokens = int(batch.attention_mask.sum())
    n = non_embedding_params(model)
    policy = adapter.policy(model, 1.0)
    banned = adapter.banned_token_ids
    # behavior logprobs near the model's own (as a sampler's are), so ratios are near 1 and nothing is masked
    with torch.no_grad():
        model.eval()
        own, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    noise = 0.05 * torch.randn(own.shape, generator=torch.Generator().manual_seed(1)).to(device)
    batch.behavior_logprobs = (own + noise) * batch.loss_mask

    def zero():
        model.zero_grad(set_to_none=True)

    def naive_step():  # (MoE: transformers' grouped_mm experts; vlrl's path runs its own, moe_experts.py)
        zero()
        with experts(model, "grouped_mm"):
            naive_update(model, batch, settings, args.completion, banned)

    def vlrl_step():
        zero()
        accumulate_gradients(policy, batch, [list(range(batch.size))], settings, args.completion, device)

    def naive_fwd():
        with torch.no_grad(), transformers_defaults(model), experts(model, "grouped_mm"):
            naive_logprobs(model, batch, banned)

    def naive_eager_step():  # transformers' default experts: a Python loop over the experts hit
        zero()
        with experts(model, "eager"):
            naive_update(model, batch, settings, args.completion, banned)

    def vlrl_fwd():
        with torch.no_grad():
            policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)

    rows = []
    vision_err = shared_vision_error(model, batch)
    conv_err, matmul_err = patch_embed_errors(model, batch)
    # exactness first: logprobs and gradients of the fast path against the naive path, same weights
    set_trainable(model, vision=False, checkpointing=True)
    try:
        zero()
        with experts(model, "grouped_mm"):
            ref_lp = naive_update(model, batch, settings, args.completion, banned, matmul_patch_embed=True)
        ref_g = grads_of(model, device.type == "cpu")
        zero()
        with torch.no_grad():
            fast_lp, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
        accumulate_gradients(policy, batch, [list(range(batch.size))], settings, args.completion, device)
        fast_g = grads_of(model, device.type == "cpu")
        m = batch.loss_mask.bool()
        lp_diff = float((fast_lp - ref_lp)[m].abs().max())
        assert set(fast_g) == set(ref_g), set(fast_g) ^ set(ref_g)
        assert any(float(g.abs().max()) > 0 for g in ref_g.values())
        errs = {k: rel_err(fast_g[k], ref_g[k]) for k in ref_g}
        g_err = max(errs.values())
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:4]
        print(f"  {name}: worst gradient rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in worst), flush=True)
        del ref_g, fast_g, ref_lp
    except torch.OutOfMemoryError:  # the naive reference itself does not fit
        lp_diff = g_err = float("nan")
    zero()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    variants = [
        ("naive update (all params, ckpt, full logits)", naive_step, dict(vision=True, checkpointing=True), 6),
        ("vlrl update (frozen vision, ckpt, chunked logprobs)", vlrl_step, dict(vision=False, checkpointing=True), 6),
        ("vlrl update, no checkpointing", vlrl_step, dict(vision=False, checkpointing=False), 6),
        ("naive logprob pass (full logits)", naive_fwd, dict(vision=False, checkpointing=False), 2),
        ("vlrl logprob pass (chunked)", vlrl_fwd, dict(vision=False, checkpointing=False), 2),
    ]
    if hasattr(model.config.text_config, "num_experts"):  # MoE: the naive path with transformers' default experts
        variants.insert(0, ("naive update, eager experts (all params, ckpt, full logits)", naive_eager_step,
                            dict(vision=True, checkpointing=True), 6))
        variants[1] = ("naive update, grouped_mm experts (all params, ckpt, full logits)",) + variants[1][1:]
    if args.profile and device.type == "cuda":
        profile(vlrl_step, model, device)
    if args.breakdown and device.type == "cuda":
        set_trainable(model, vision=False, checkpointing=False)
        breakdown(naive_fwd, model, device, "naive logprob pass")
        breakdown(vlrl_fwd, model, device, "vlrl logprob pass")
    if args.compile:
        variants += [
            ("vlrl update, compiled layers", vlrl_step, dict(vision=False, checkpointing=True, compiled=True), 6),
            ("vlrl logprob pass, compiled layers", vlrl_fwd, dict(vision=False, checkpointing=False, compiled=True), 2),
        ] + [
            (f"vlrl update, compiled layers, checkpoint {f:.0%} of layers", vlrl_step,
             dict(vision=False, checkpointing=True, compiled=True, fraction=f), 6)
            for f in args.fractions
        ]
    compile_failed = False
    for label, fn, mode, flops_per_param in variants:
        if args.skip and any(s in label for s in args.skip) or compile_failed and mode.get("compiled"):
            continue
        if mode.pop("compiled", False) and not getattr(model, "_bench_compiled", False):
            from vlrl.adapters.qwen3_vl import compile_layers

            set_trainable(model, **mode)
            compile_layers(model)
            policy.fused_head = True  # what train.compile turns on with the compiled layers
            model._bench_compiled = True
            t0 = time.perf_counter()
            try:
                fn()
                sync(device)
            except Exception as e:  # (a model whose layers do not compile: the other cases still run)
                print(f"  {name} | {label}: compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                zero()
                compile_failed = True
                continue
            print(f"  compile + first step: {time.perf_counter() - t0:.1f} s", flush=True)
            if args.breakdown and device.type == "cuda":
                set_trainable(model, vision=False, checkpointing=False)
                breakdown(vlrl_fwd, model, device, "vlrl logprob pass, compiled")
        set_trainable(model, **mode)
        try:
            peak = peak_gib(device, fn)
            t = timed(fn, device, args.warmup, args.repeat)
        except torch.OutOfMemoryError:
            zero()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(dict(case=name, path=label, seconds=None, tokens_per_s=None, mfu=None, peak_gib="OOM"))
            print(f"  {name} | {label}: OOM", flush=True)
            continue
        zero()
        tps = tokens / t
        mfu = flops_per_param * n * tps / (PEAK_TFLOPS * 1e12)
        rows.append(dict(case=name, path=label, seconds=t, tokens_per_s=tps, mfu=mfu, peak_gib=peak))
        print(f"  {name} | {label}: {t:.3f} s, {tps:,.0f} tokens/s, MFU {mfu:.1%}, peak {peak:.1f} GiB", flush=True)
    if getattr(model, "_bench_compiled", False):  # every case starts uncompiled (and below dynamo's recompile limit)
        for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:
            layer._compiled_call_impl = None
        model._bench_compiled = False
        torch._dynamo.reset()
    results.append(dict(case=name, tokens=tokens, rows=rows, logprob_max_abs_diff=lp_diff, grad_max_rel_err=g_err,
                        shared_vision_rel_err=vision_err, vision_vs_float32_conv=conv_err,
                        vision_vs_float32_matmul=matmul_err))


def run_auto_cases(model, adapter, device, args, settings, vocab) -> list[dict]:
    """`auto` checkpointing against fixed fractions (bench/checkpointing.py), once per --memory-caps value."""
    from types import SimpleNamespace

    from vlrl.adapters.qwen3_vl import compile_layers

    policy = adapter.policy(model, 1.0, fused_head=args.compile)
    set_trainable(model, vision=False, checkpointing=True)
    if args.compile and not getattr(model, "_bench_compiled", False):
        compile_layers(model)
        model._bench_compiled = True
    rollouts = make_rollouts(adapter, args.batch, args.seq_len, args.images, args.image_side,
                             min(args.completion, args.seq_len // 2), vocab)
    tools = SimpleNamespace(timed=timed, set_trainable=set_trainable, non_embedding_params=non_embedding_params,
                            peak_tflops=PEAK_TFLOPS)
    out = []
    for cap in args.memory_caps:
        args.memory_cap = cap
        out.append(checkpointing.run(model, adapter, policy, device, args, settings, rollouts, tools))
        gc.collect()
        torch.cuda.empty_cache()
    return out


def run_auto_ragged(model, adapter, device, args, vocab) -> list[dict]:
    """`auto` on the ragged batch as shipped (bench/checkpointing.py's run_ragged), once per --memory-caps value
    (on the CPU, once)."""
    from types import SimpleNamespace

    from vlrl.adapters.qwen3_vl import compile_layers

    policy = adapter.policy(model, 1.0, fused_head=args.compile)
    set_trainable(model, vision=False, checkpointing=True)
    if args.compile and not getattr(model, "_bench_compiled", False):
        compile_layers(model)
        model._bench_compiled = True
        # a ladder of checkpointing kinds over ragged micro-batch shapes: more graph variants than dynamo's default
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    tools = SimpleNamespace(timed=timed, set_trainable=set_trainable, non_embedding_params=non_embedding_params,
                            peak_tflops=PEAK_TFLOPS, sync=sync)
    big = vocab > 150000
    ids = (vocab, VISION_START if big else adapter.image_token_id - 2, VISION_END if big else adapter.image_token_id - 1)
    out = []
    moves = {"auto": ["auto"], "on": [True], "off": [False], "both": [True, False]}[args.offload_optimizer]
    exact = checkpointing.offload_exact(device, *((256, 2) if device.type == "cpu" else ())) if any(moves) else None
    if exact is not None:
        print(f"  offload exact: {exact}", flush=True)
    for cap in args.memory_caps if device.type == "cuda" else [0.0]:
        for tokens in args.ragged_tokens:
            for offload in moves:
                out.append(checkpointing.run_ragged(model, adapter, policy, device, args, AlgorithmConfig(), tools,
                                                    ids, cap, offload=offload, token_budget=tokens,
                                                    floor=shipped().model.max_model_len if not args.tiny else 0))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if exact is not None:
        out[0]["exact"] = exact
    return out


def run_ragged_case(model, adapter, device, args, vocab) -> dict:
    """The ragged GRPO case (bench/ragged.py), as configs/qwen3-vl-8b.toml trains: frozen vision, checkpointing
    (with --compile: compiled layers and the first of --fractions), chunked logprobs."""
    from vlrl.adapters.qwen3_vl import compile_layers

    fraction = args.fractions[0] if args.compile and args.fractions else 1.0
    policy = adapter.policy(model, 1.0)
    settings = AlgorithmConfig()
    if args.compile:
        set_trainable(model, vision=False, checkpointing=True, fraction=fraction)
        compile_layers(model)
        policy.fused_head = True
        # one process runs padded and packed updates with every image count: more graph variants than a
        # training run has (dynamo's default of 8 would send the rest to eager and flatter the compile count)
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    big = vocab > 150000
    ids = (vocab, VISION_START if big else adapter.image_token_id - 2, VISION_END if big else adapter.image_token_id - 1)
    try:
        return ragged.run_ragged(
            model, adapter, policy, device, args, settings, non_embedding_params(model), PEAK_TFLOPS, ids, sync,
            lambda: set_trainable(model, vision=False, checkpointing=True, fraction=fraction), grads_of, rel_err)
    finally:
        if args.compile:
            for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:
                layer._compiled_call_impl = None
            torch._dynamo.reset()


def max_tokens_that_fit(model, adapter, device, args, settings, seq_len, images, side, completion, vocab):
    """Largest micro-batch (samples x seq_len tokens) whose full-parameter update fits, for both paths."""
    out = {}
    policy = adapter.policy(model, 1.0)
    for label, update, vision in (("naive", "naive", True), ("vlrl", "vlrl", False)):
        set_trainable(model, vision=vision, checkpointing=True)

        def fits(b: int) -> bool:
            batch = adapter.build_batch(make_rollouts(adapter, b, seq_len, images, side, completion, vocab)).to(device)
            model.zero_grad(set_to_none=True)
            try:
                if update == "naive":
                    naive_update(model, batch, settings, completion, adapter.banned_token_ids)
                else:
                    accumulate_gradients(policy, batch, [list(range(b))], settings, completion, device)
                sync(device)
                return True
            except torch.OutOfMemoryError:
                return False
            finally:
                del batch
                model.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()

        # doubling, then bisection to a step of 4 samples
        best, b = 0, args.fit_start
        while b <= args.fit_max and fits(b):
            best, b = b, b * 2
        lo, hi = best, min(b, args.fit_max + 1)
        while hi - lo > 4:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        best = lo
        out[label] = {"samples": best, "tokens": best * seq_len}
    return out


def shipped():
    """configs/qwen3-vl-8b.toml: the ragged batch as the 8B is shipped (its micro_batch_tokens, max_model_len)."""
    from vlrl.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs/qwen3-vl-8b.toml")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (float32)")
    ap.add_argument("--family", default="qwen3-vl", choices=["qwen3-vl", "qwen3-vl-moe", "qwen3.5"],
                    help="qwen3-vl: the 8B architecture; qwen3-vl-moe: Qwen3-VL-30B-A3B's (grouped_mm experts); "
                         "qwen3.5: Qwen3.5-9B's (with --tiny: the tiny model of the family)")
    ap.add_argument("--experts", choices=["grouped_mm", "vlrl"],
                    help="qwen3-vl-moe: vlrl's path's experts (default: the config's); the naive path keeps "
                         "transformers' grouped_mm")
    ap.add_argument("--layers", type=int, help="decoder layers (qwen3-vl-moe: of 48; 12 fit one H200)")
    ap.add_argument("--delta-rule", choices=["torch", "fla", "transformers"], default="transformers",
                    help="Qwen3.5: vlrl's path's gated delta rule (the naive path always runs transformers' "
                         "PyTorch reference)")
    ap.add_argument("--lift-fla-hopper-guard", action="store_true",
                    help="let flash-linear-attention 0.6.0 run its own gated backward on Hopper with Triton < 3.7.1, "
                         "which it refuses (fla#640: wrong dk/db/dg), instead of vlrl's replacement of that "
                         "kernel (vlrl/adapters/fla_hopper.py); to measure its speed and its error")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1041)
    ap.add_argument("--images", type=int, default=1, help="images per sample")
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--completion", type=int, default=768)
    ap.add_argument("--group", type=int, default=8,
                    help="also run the first shape as GRPO groups of this many samples sharing a prompt (1: skip)")
    ap.add_argument("--host-syncs", action="store_true",
                    help="transformers' defaults, for comparison: its own vision attention (boundaries read from "
                         "the GPU, one call per image) and M-RoPE positions computed in every forward")
    ap.add_argument("--breakdown", action="store_true",
                    help="print where one logprob pass spends its time (vision, merge, language model, head)")
    ap.add_argument("--long", default="8x4096x4", help="long case BATCHxSEQxIMAGES ('' to skip)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-tokens", action="store_true", help="also search the largest micro-batch that fits")
    ap.add_argument("--fit-start", type=int, default=8)
    ap.add_argument("--fit-max", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], help="skip variants whose label contains these words")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--compile", action="store_true", help="also time vlrl's path with compiled layers (train.compile)")
    ap.add_argument("--profile", action="store_true",
                    help="print the top CUDA kernels of one vlrl update and of one packed ragged update")
    ap.add_argument("--fractions", type=float, nargs="*", default=[], help="with --compile: checkpoint fractions "
                    "(the ragged case uses the first: 0.75 is configs/qwen3-vl-8b.toml's)")
    ap.add_argument("--ragged", type=int, nargs=2, default=[8, 8], metavar=("PROMPTS", "GROUP"),
                    help="ragged case: prompts x group size (8 x 8 = 64 rollouts)")
    ap.add_argument("--ragged-median", type=float, default=400.0, help="ragged completions: log-normal median")
    ap.add_argument("--ragged-sigma", type=float, default=0.8, help="ragged completions: log-normal sigma")
    ap.add_argument("--ragged-clip", type=int, nargs=2, default=[16, 2048], help="ragged completions: shortest, longest")
    ap.add_argument("--ragged-tokens", type=int, nargs="+", default=None,
                    help="ragged case: micro_batch_tokens (with --auto: each value in turn; otherwise the first); "
                    "default: with --auto on the 8B, configs/qwen3-vl-8b.toml's (as shipped), else 16384")
    ap.add_argument("--ragged-seed", type=int, default=0)
    ap.add_argument("--ragged-repeat", type=int, default=2, help="timed updates per ragged path (after one untimed)")
    ap.add_argument("--ragged-only", action="store_true", help="only the ragged case (no equal-length cases)")
    ap.add_argument("--no-ragged", action="store_true", help="skip the ragged case")
    ap.add_argument("--auto", action="store_true", help="train.checkpoint_fraction = auto against fixed fractions "
                    "(equal-length case, compiled layers; bench/checkpointing.py)")
    ap.add_argument("--optimizer", action="store_true", help="with --auto: each step includes AdamW's (its state)")
    ap.add_argument("--auto-only", action="store_true", help="with --auto: only the auto cases")
    ap.add_argument("--offload-optimizer", choices=["auto", "on", "off", "both"], default="auto",
                    help="with --auto: train.offload_optimizer on the ragged batch: auto (as shipped: measured both "
                         "ways, kept where it spares layers recomputed whole), on, off, or both (on, then off)")
    ap.add_argument("--placement", choices=["stacked", "spread"], default="stacked",
                    help="where each checkpointing kind goes (vlrl/adapters/checkpointing.py's PLACEMENT)")
    ap.add_argument("--unpaced-offload", action="store_true",
                    help="with the optimizer offload: fetch each moment as soon as its gradient is final")
    ap.add_argument("--ragged-fixed", type=float, nargs=2, action="append", default=[], metavar=("FULL", "SELECTIVE"),
                    help="with --auto: also time the ragged batch at these fractions of layers recomputed whole and "
                         "selectively (repeatable)")
    ap.add_argument("--memory-caps", type=float, nargs="*", default=[0.0], metavar="GIB",
                    help="with --auto: run once per cap on the process's GPU memory (0: the whole card), in order")
    ap.add_argument("--compile-steps", type=int, default=20,
                    help="with --compile: ragged packed steps whose compiles are counted")
    ap.add_argument("--pageable-uploads", action="store_true",
                    help="micro-batches go to the GPU from pageable memory (vlrl.batch.PIN_UPLOADS off), to measure it")
    args = ap.parse_args()
    if args.ragged_tokens is None:
        args.ragged_tokens = [shipped().train.micro_batch_tokens if args.auto and args.family == "qwen3-vl" else 16384]
    import vlrl.adapters.checkpointing

    vlrl.adapters.checkpointing.PLACEMENT = args.placement
    if args.pageable_uploads:
        import vlrl.batch

        vlrl.batch.PIN_UPLOADS = False

    from transformers import AutoModelForImageTextToText

    settings = AlgorithmConfig()  # the config's defaults
    moe = args.family == "qwen3-vl-moe"
    if moe:
        moe_experts.register()
    moe_kwargs = {"experts_implementation": args.experts or ModelConfig().experts_implementation} if moe else {}
    if args.tiny:
        import tempfile

        from vlrl.adapters import build_tiny_model

        device, dtype = torch.device("cpu"), torch.float32
        path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", args.family)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **moe_kwargs)
        cfg = model.config
        args.batch, args.seq_len, args.image_side, args.completion, args.group = 4, 160, 64, 96, 2
        args.long, args.warmup, args.repeat = "4x256x2", 1, 3
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = (qwen3_vl_30b_a3b_config(args.layers) if moe else qwen3_5_9b_config() if args.family == "qwen3.5"
               else qwen3_vl_8b_config())
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa",
                                                            **moe_kwargs)
    # as Qwen3VLAdapter.load_model does (the naive path turns image sharing and the vision fast path off)
    patch_model(model, vision=not args.host_syncs)
    if moe:
        from vlrl.adapters.routing import patch_routers

        patch_routers(model.model.language_model)
    if has_linear_attention(model.model.language_model):
        if args.lift_fla_hopper_guard:
            import fla.ops.common.chunk_o as chunk_o

            chunk_o.TRITON_ABOVE_3_7_1 = True
            os.environ["VLRL_FLA_DQKWG"] = "0"  # fla's own kernel, not vlrl's replacement
        set_delta_rule(model.model.language_model, args.delta_rule)
        model._bench_delta_rule = args.delta_rule
        from vlrl.adapters.fla_hopper import fla_refuses_here, kernel_choice

        ours = fla_refuses_here() and not args.lift_fla_hopper_guard and args.delta_rule != "torch"
        print(f"Qwen3.5: vlrl's path runs the '{args.delta_rule}' gated delta rule"
              f"{f' (fla with vlrl chunk_bwd_dqkwg, {kernel_choice()})' if ours else ''}, the naive path "
              "transformers' PyTorch "
              "reference; causal conv1d: PyTorch (packed: vlrl's masked taps)", flush=True)
    vocab = cfg.text_config.vocab_size
    adapter = bench_adapter(cfg.image_token_id, cfg.video_token_id, PAD if vocab > 150000 else 0,
                            IM_END if vocab > 150000 else 1, max_model_len=1 << 20, family=args.family)
    results = []
    cases = [(f"{args.batch} x {args.seq_len}, {args.images} image(s) of {args.image_side}px",
              args.batch, args.seq_len, args.images, 1)]
    if args.group > 1:
        cases.append((f"{args.batch} x {args.seq_len}, {args.images} image(s) of {args.image_side}px, groups of "
                      f"{args.group}", args.batch, args.seq_len, args.images, args.group))
    if args.long:
        b, s, i = (int(x) for x in args.long.split("x"))
        cases.append((f"{b} x {s}, {i} image(s) of {args.image_side}px", b, s, i, 1))
    for name, b, s, i, group in [] if args.ragged_only or args.auto_only else cases:
        completion = min(args.completion, s // 2)
        rollouts = make_rollouts(adapter, b, s, i, args.image_side, completion, vocab, group=group)
        run_case(name, model, adapter, rollouts, device, args, settings, results)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ragged_result = None
    if not args.no_ragged and not args.auto_only:
        ragged_result = run_ragged_case(model, adapter, device, args, vocab)
    auto_results, auto_ragged = [], []
    if args.auto:
        auto_ragged = run_auto_ragged(model, adapter, device, args, vocab)
    if args.auto and device.type == "cuda" and not args.ragged_only:
        auto_results = run_auto_cases(model, adapter, device, args, settings, vocab)
    fit = None
    if args.max_tokens and device.type == "cuda":
        fit = max_tokens_that_fit(model, adapter, device, args, settings, args.seq_len, args.images, args.image_side,
                                  args.completion, vocab)

    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{dev}, torch {torch.__version__}, N = {non_embedding_params(model) / 1e9:.2f}B params (6N/2N rule)")
    if results:
        print("| case | path | s | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|")
    for r in results:
        for row in r["rows"]:
            if row["seconds"] is None:
                print(f"| {r['case']} | {row['path']} | OOM | - | - | - |")
                continue
            print(f"| {r['case']} | {row['path']} | {row['seconds']:.3f} | {row['tokens_per_s']:,.0f} | "
                  f"{row['mfu']:.1%} | {row['peak_gib']:.1f} |")
        print(f"| {r['case']} | fast vs naive | logprob max abs diff {r['logprob_max_abs_diff']:.2e}, "
              f"grad max rel err {r['grad_max_rel_err']:.2e}, shared-image vision features rel err "
              f"{r['shared_vision_rel_err']:.1e}; vision features vs float32: conv patch embedding "
              f"{r['vision_vs_float32_conv']:.1e}, matmul {r['vision_vs_float32_matmul']:.1e} | | | |")
    if fit:
        print(f"largest micro-batch that fits (update, {args.seq_len} tokens/sample): naive {fit['naive']['tokens']:,} "
              f"tokens, vlrl {fit['vlrl']['tokens']:,} tokens ({fit['vlrl']['tokens'] / max(fit['naive']['tokens'], 1):.1f}x)")
    if ragged_result is not None:
        ragged.print_table(ragged_result)
    for r in auto_results:
        checkpointing.print_table(r)
    for r in auto_ragged:
        checkpointing.print_ragged(r)
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "results": results, "fit": fit, "ragged": ragged_result},
                                        indent=2))
    def speedups(rows):
        by = {row["path"]: row for row in rows}

        def ratio(fast, slow):
            f, s = by.get(fast), by.get(slow)
            ok = f and s and f["tokens_per_s"] and s["tokens_per_s"]
            return f["tokens_per_s"] / s["tokens_per_s"] if ok else math.nan

        naive = next((k for k in by if k.startswith("naive update") and "eager" not in k), None)
        up = max((ratio(k, naive) for k in by if k.startswith("vlrl update")), default=math.nan)
        lp = max((ratio(k, "naive logprob pass (full logits)") for k in by if k.startswith("vlrl logprob pass")),
                 default=math.nan)
        return up, lp

    for r in results[1:]:
        print(f"{r['case']}: update speedup {speedups(r['rows'])[0]:.2f}x, logprob speedup {speedups(r['rows'])[1]:.2f}x")
    if ragged_result is not None:
        print(ragged.summary_line(ragged_result))
    for r in auto_ragged[1:]:
        print(checkpointing.ragged_line(r))
    if auto_ragged and "exact" in auto_ragged[0]:
        e = auto_ragged[0]["exact"]
        print(f"offloaded optimizer state vs AdamW's own ({e['offloaded_gib']:.2f} GiB moved, {e['steps']} steps): "
              f"max |weight diff| {e['weights']:.1e}, max |moment diff| {e['moments']:.1e}")
    if auto_ragged:
        print(checkpointing.ragged_line(auto_ragged[0]))
    up, lp = speedups(results[0]["rows"]) if results else (math.nan, math.nan)  # the baseline's shapes
    print(f"update speedup {up:.2f}x, logprob speedup {lp:.2f}x")
    if moe and results and ragged_result is not None:
        by = {row["path"]: row for row in results[0]["rows"] if row["seconds"]}
        packed = [r for r in ragged_result["rows"] if r.get("seconds") and r["packed"]]
        best = max(packed, key=lambda r: r["tokens_per_s"]) if packed else None
        eager = next((r for k, r in by.items() if "eager experts" in k), None)
        grouped = next((r for k, r in by.items() if "grouped_mm experts" in k), None)
        if best and eager and grouped:
            print(f"MoE: packed ragged update {best['tokens_per_s']:,.0f} useful tokens/s, MFU {best['mfu']:.1%} "
                  f"on active params; {best['tokens_per_s'] / eager['tokens_per_s']:.1f}x the naive eager path "
                  f"({eager['mfu']:.1%}), {best['tokens_per_s'] / grouped['tokens_per_s']:.2f}x naive grouped_mm "
                  f"({grouped['mfu']:.1%})")

if __name__ == "__main__":
    main()
