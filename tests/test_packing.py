"""Packed micro-batches give the padded path's logprobs and gradients; the token-budget planner."""

import copy
import warnings

import pytest
import torch
from PIL import Image

from vlrl.batch import batch_logprobs, plan_micro_batches
from vlrl.config import AlgorithmConfig, TrainConfig
from vlrl.planner import (
    StepPlan,
    balance_ranks,
    micro_batch_tokens,
    pack_micro_batches,
    packing_report,
    plan_step,
)
from vlrl.records import Rollout
from vlrl.update import accumulate_gradients

IMAGES = [0, 1, 2, 0, 1, 0, 2, 1]  # image-less, single-image and two-image samples
COMPLETIONS = [3, 41, 9, 27, 2, 60, 15, 33]  # mixed lengths


@pytest.fixture(scope="module")
def batch(adapter):
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i, (n_img, n_comp) in enumerate(zip(IMAGES, COMPLETIONS)):
        imgs = [Image.new("RGB", (64 + 32 * ((i + k) % 2), 64 + 32 * (k % 2)), (40 * i, 90 * k, 200))
                for k in range(n_img)]
        prompt = adapter.encode_prompt(adapter.build_messages(f"Question {i}?" + " more" * i, n_img), imgs)
        comp = torch.randint(0, 390, (n_comp,), generator=g).tolist()
        lps = (-torch.rand(n_comp, generator=g) * 3).tolist()
        rollouts.append(Rollout(prompt=prompt, completion_ids=comp, logprobs=lps, finish_reason="length",
                                advantage=float(torch.randn(1, generator=g))))
    return adapter.build_batch(rollouts)


SPLITS = {1: [list(range(8))], 2: [[0, 2, 4, 6], [1, 3, 5, 7]], 4: [[5, 0], [7, 2], [1, 3], [6, 4]]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def gradients(policy, batch, plan, settings, ref=None):
    policy.zero_grad(set_to_none=True)
    stats = accumulate_gradients(policy, batch, plan, settings, 64, ref_policy=ref)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("route", ["sdpa", "flex"])
def test_packed_logprobs_equal_padded(adapter, tiny_model, batch, route):
    policy = adapter.policy(tiny_model, 1.0)
    policy.packed_attention = route
    with torch.no_grad():
        want, want_ent = batch_logprobs(policy, batch.select(list(range(batch.size))))
        for groups in SPLITS.values():
            for g in groups:
                got, ent = batch_logprobs(policy, batch.pack(g))
                m = batch.loss_mask[g, : got.shape[1]].bool()
                # a logprob exactly on the trained tokens, in the padded layout
                assert torch.equal(got != 0, m)
                torch.testing.assert_close(got, want[g, : got.shape[1]], atol=2e-6, rtol=1e-6)
                torch.testing.assert_close(ent, want_ent[g, : got.shape[1]], atol=2e-6, rtol=1e-6)


# float32's rounding: the padded path split 4 ways differs from itself by up to 6e-7 (relative, per
# parameter); in float64 packed and padded agree to 1e-15, so what float32 shows is rounding, not a
# difference. k3's gradient, 1 - exp(ref - logp), is a difference of two logprobs that agree to ~1e-7: with a
# KL term float32 shows ~2e-6.
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-12}
KL_TOLERANCE = {torch.float32: 5e-6, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def models(tiny_model):
    return {torch.float32: tiny_model, torch.float64: copy.deepcopy(tiny_model).double()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", [("token", "token-mean", 0.0), ("sequence", "seq-mean-token-mean", 0.0),
                                  ("token", "constant", 0.5)], ids=["token", "gspo", "kl"])
def test_packed_gradients_equal_padded_for_1_2_and_4_micro_batches(adapter, models, batch, dtype, loss):
    """Every parameter (vision tower included) gets the padded whole batch's gradient (the CPU's route,
    per-sample sdpa: FlexAttention has no backward on the CPU; the GPU bench checks the others). With a
    KL term, the reference model's logprob pass is packed too."""
    model = copy.deepcopy(models[dtype]).train()
    policy = adapter.policy(model, 1.0)
    ref = None
    if loss[2]:
        ref = adapter.policy(copy.deepcopy(models[dtype]).eval(), 1.0)
        with torch.no_grad():
            for p in ref.parameters():
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                p.add_(0.01 * noise.to(p.dtype))
    settings = AlgorithmConfig(policy_loss=loss[0], aggregation=loss[1], entropy_coef=0.01, kl_coef=loss[2])
    want, s0 = gradients(policy, batch, [list(range(batch.size))], settings, ref)
    assert any("visual" in n for n in want) and len(want) == sum(1 for p in model.parameters())
    assert (s0["kl_sum"] > 0) == (ref is not None)
    for n, groups in SPLITS.items():
        got, s = gradients(policy, batch, StepPlan(groups, packed=True), settings, ref)
        assert s["loss"] == pytest.approx(s0["loss"], rel=1e-6)
        assert s["kl_sum"] == pytest.approx(s0["kl_sum"], rel=1e-5)
        assert s["padded_tokens"] == s["attended_tokens"] == sum(batch.lengths)  # no padding computed
        assert set(got) == set(want)
        worst = max(rel(got[k], want[k]) for k in want)
        print(f"{loss[:2]} {str(dtype)[6:]}, {n} packed micro-batches: worst gradient rel err {worst:.1e}")
        assert worst < (KL_TOLERANCE if ref is not None else TOLERANCE)[dtype], (n, worst)


def test_a_sample_whose_first_token_is_trained_cannot_be_packed(batch):
    bad = copy.deepcopy(batch)
    bad.loss_mask[1, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        bad.pack([0, 1])


def test_packed_positions_are_each_samples_own(adapter, tiny_model, batch):
    """The packed M-RoPE positions are the model's own `get_rope_index` of each sample alone."""
    packed = batch.pack([3, 1, 6])
    start = 0
    for i in (3, 1, 6):
        n = batch.lengths[i]
        alone = batch.select([i])
        theirs, _ = tiny_model.model.get_rope_index(alone.input_ids, alone.model_inputs["mm_token_type_ids"],
                                                    image_grid_thw=alone.model_inputs.get("image_grid_thw"))
        assert torch.equal(packed.model_inputs["position_ids"][:, 0, start : start + n], theirs[:, 0])
        start += n
    assert packed.model_inputs["cu_seqlens"].tolist() == [0, batch.lengths[3],
                                                          batch.lengths[3] + batch.lengths[1], start]


# --- the planner --------------------------------------------------------------------------------------------
def test_first_fit_decreasing_respects_budgets_in_length_order():
    lengths = [30, 70, 20, 50, 40, 10]
    # longest first: 70 opens bin 0; 50 opens bin 1 (70 + 50 > 100); 40 joins 50; 30 fills bin 0 (100);
    # 20 fits neither (110, 110): bin 2; 10 joins 50 + 40 (100)
    assert pack_micro_batches(lengths, 100) == [[0, 1], [3, 4, 5], [2]]
    patches = [0, 8, 0, 8, 8, 0]  # three samples with an image of 8 patches, at most one image per bin
    groups = pack_micro_batches(lengths, 100, patches, max_patches=8)
    # 70 (img) bin 0; 50 (img) bin 1; 40 (img) bin 2; 30 joins 70; 20 joins 50; 10 joins 50 + 20
    assert groups == [[0, 1], [2, 3, 5], [4]]
    for g in groups:
        assert sum(lengths[i] for i in g) <= 100 and sum(patches[i] for i in g) <= 8
    assert pack_micro_batches([150, 10], 100) == [[0], [1]]  # over budget alone: a micro-batch of its own


def test_rank_balance_by_tokens_beats_balance_by_samples():
    """A ragged GRPO-like step: rank 0's completions ran long. Equal sample counts leave it 3x the tokens."""
    lengths = [[900, 850, 800, 700, 120, 110], [150, 140, 130, 120, 100, 90]]
    by_samples = [sum(ls) for ls in lengths]
    shares = balance_ranks(lengths)
    assert sorted(s for share in shares for s in share) == sorted((r, i) for r in range(2) for i in range(6))
    loads = [sum(lengths[r][i] for r, i in share) for share in shares]
    assert max(by_samples) - min(by_samples) == 2750
    assert max(loads) - min(loads) == 30  # 3480 vs 730 tokens -> 2120 vs 2090
    moved = sum(1 for dst, share in enumerate(shares) for r, _ in share if r != dst)
    assert moved <= 4  # of 12: few rollouts (and their pixels) travel
    assert balance_ranks([[5, 5], [5, 5]]) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]  # balanced: nothing moves


def test_plan_step_packs_by_tokens_and_pads_with_a_reason(adapter, batch):
    rollouts = [None] * batch.size
    train = TrainConfig(micro_batch_size=2, micro_batch_tokens=200)
    b, plan = plan_step(rollouts, [], lambda rs: batch, train)
    assert plan.packed and plan.reason is None and plan.total_tokens == batch.num_loss_tokens
    assert micro_batch_tokens(b.lengths, plan.micro_batches, True) == [
        sum(b.lengths[i] for i in g) for g in plan.micro_batches]
    assert all(t <= 200 for t in micro_batch_tokens(b.lengths, plan.micro_batches, True))
    assert sorted(i for g in plan.micro_batches for i in g) == list(range(batch.size))
    report = packing_report(b, plan, train)
    assert report["padding_after"] == 0.0 < report["padding_before"]
    assert report["micro_batches"] < report["micro_batches_before"]  # (micro_batch_size 2: 4 or more padded)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _, padded = plan_step(rollouts, [], lambda rs: batch, train, unavailable="eager attention: padded")
    assert not padded.packed and padded.reason == "eager attention: padded"
    # today's, in order
    assert padded.micro_batches == plan_micro_batches(b.lengths, 2, 200, b.patches_per_sample)
    _, off = plan_step(rollouts, [], lambda rs: batch, train.model_copy(update={"packing": False}))
    assert not off.packed and off.reason is None and off.micro_batches == padded.micro_batches
    # ranks: counts summed, passes padded to the busiest rank's
    _, plan = plan_step(rollouts, [], lambda rs: batch, train,
                        reduce=lambda v, op: [x * 2 for x in v] if op == "sum" else [x + 2 for x in v])
    assert plan.total_tokens == 2 * batch.num_loss_tokens and plan.padding_passes == 2
    assert len(plan.passes) == len(plan.micro_batches) + 2 and plan.passes[-1][1] == 0.0


def test_attention_routes():
    from vlrl.adapters.packing import resolve_route

    cpu = torch.device("cpu")
    assert resolve_route("auto",
                         cpu, torch.float32) == "sdpa" and resolve_route("flex", cpu, torch.float32) == "flex"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_route("varlen", cpu, torch.bfloat16)


def test_packing_unavailable_names_the_attention(model_cfg):
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter

    eager = Qwen3VLAdapter.from_config(model_cfg.model_copy(update={"attn_implementation": "eager"}))
    model = eager.load_model(torch.float32)
    reason = eager.packing_unavailable(model)
    assert "model.attn_implementation = 'eager'" in reason and "padded" in reason
    assert TrainConfig().packing is True


def test_the_padded_path_is_transformers_sdpa_bit_for_bit(adapter, tiny_model, batch):
    """Packing's attention patch leaves padded batches (and generation) to transformers' own sdpa."""
    from vlrl.adapters.packing import NAME

    policy = adapter.policy(tiny_model, 1.0)
    config = tiny_model.model.language_model.config
    mb = batch.select(list(range(batch.size)))
    with torch.no_grad():
        patched = batch_logprobs(policy, mb)
        assert config._attn_implementation == NAME
        try:
            config._attn_implementation = "sdpa"
            plain = batch_logprobs(policy, mb)
        finally:
            config._attn_implementation = NAME
    assert torch.equal(patched[0], plain[0]) and torch.equal(patched[1], plain[1])


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), scale=None,
                      enable_gqa=False):
    """What torch's varlen_attn computes (CUDA only), per sample with sdpa: [T, heads, dim] in and out."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, l, dim]
        o = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                             enable_gqa=enable_gqa)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("gqa", [False, True], ids=["torch-2.11", "torch-2.14"])
def test_the_varlen_route_glue_with_a_cpu_stand_in_for_the_kernel(
    adapter, tiny_model, batch, monkeypatch, gqa):
    """The varlen route's plumbing (keywords to every layer, layouts, GQA by repeated k/v or enable_gqa,
    causality, scale) with the kernel replaced by a per-sample sdpa: the padded path's logprobs and
    gradients."""
    from vlrl.adapters import packing

    monkeypatch.setitem(packing._VARLEN, "fn", _reference_varlen)
    monkeypatch.setitem(packing._VARLEN, "gqa", gqa)
    monkeypatch.setitem(packing._VARLEN, "scale", True)
    monkeypatch.setitem(packing._VARLEN, "causal", {"window_size": (-1, 0)})
    monkeypatch.setattr(packing, "resolve_route", lambda requested, device, dtype: "varlen")
    model = copy.deepcopy(tiny_model).train()
    policy = adapter.policy(model, 1.0)
    settings = AlgorithmConfig(entropy_coef=0.01)
    want, s0 = gradients(policy, batch, [list(range(batch.size))], settings)
    got, s = gradients(policy, batch, StepPlan(SPLITS[2], packed=True), settings)
    assert s["loss"] == pytest.approx(s0["loss"], rel=1e-6)
    assert max(rel(got[k], want[k]) for k in want) < TOLERANCE[torch.float32]
