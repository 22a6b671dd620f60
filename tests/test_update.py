"""The step's gradient does not depend on how the batch is split into micro-batches."""

import copy

import pytest
import torch
from host_reads import HostReads
from PIL import Image

from vlrl.config import AlgorithmConfig, RolloutConfig
from vlrl.rollout.embedded import EmbeddedSampler
from vlrl.update import accumulate_gradients


@pytest.fixture(scope="module")
def batch(adapter, tiny_model):
    prompts = []
    for i in range(4):
        imgs = [Image.new("RGB", (64 + 32 * (i % 2), 64), (50 * i, 20, 200))] * (i % 3)  # 0, 1, 2, 0 images
        prompts.append(adapter.encode_prompt(adapter.build_messages(f"Question {i}?", len(imgs)), imgs))
    rollouts = EmbeddedSampler(tiny_model, adapter,
                               RolloutConfig(max_new_tokens=6)).sample(prompts, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    for r in rollouts:
        r.advantage = float(torch.randn(1, generator=g))
        r.logprobs = [lp + 0.3 * float(torch.randn(1, generator=g)) for lp in r.logprobs]  # ratios != 1
    return adapter.build_batch(rollouts)


def grads(policy, batch, groups, settings, ref=None):
    policy.zero_grad(set_to_none=True)
    stats = accumulate_gradients(policy, batch, groups, settings, 6, ref_policy=ref)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "constant"])
@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_gradient_is_the_same_for_1_2_and_4_micro_batches(adapter, tiny_model, batch, aggregation, kind):
    model = copy.deepcopy(tiny_model).train()
    policy = adapter.policy(model, 1.0)
    settings = AlgorithmConfig(policy_loss=kind, aggregation=aggregation, entropy_coef=0.01)
    n = batch.size
    whole, s1 = grads(policy, batch, [list(range(n))], settings)
    assert len(whole) > 10 and s1["tokens"] == batch.num_loss_tokens
    for groups in ([list(range(n // 2)), list(range(n // 2, n))],
                   [list(range(i, i + 2)) for i in range(0, n, 2)],
                   [[0], [1, 2, 3, 4, 5, 6], [7]]):
        split, s = grads(policy, batch, groups, settings)
        assert s["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
        for name, g in whole.items():
            torch.testing.assert_close(split[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_kl_to_a_reference_is_zero_at_the_start_and_adds_gradient(adapter, tiny_model, batch):
    model = copy.deepcopy(tiny_model).train()
    policy = adapter.policy(model, 1.0)
    ref = adapter.policy(copy.deepcopy(tiny_model).eval(), 1.0)
    plain, _ = grads(policy, batch, [list(range(batch.size))], AlgorithmConfig())
    with_kl, s = grads(policy, batch, [list(range(batch.size))], AlgorithmConfig(kl_coef=0.5), ref)
    assert s["kl_sum"] == pytest.approx(0.0, abs=1e-9)  # identical weights: k3 = 0, gradient of k3 = 0 too
    for name in plain:
        torch.testing.assert_close(with_kl[name], plain[name], atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved, s = grads(policy, batch, [list(range(batch.size))], AlgorithmConfig(kl_coef=0.5), ref)
    assert s["kl_sum"] > 0
    assert any(not torch.allclose(moved[n], plain[n]) for n in plain)
    with pytest.raises(ValueError, match="reference policy"):
        grads(policy, batch, [list(range(batch.size))], AlgorithmConfig(kl_coef=0.5))


def test_logged_numbers_equal_the_tokens_own_and_are_read_once_a_step(adapter, tiny_model, batch):
    """Each logged number is what the tokens' logprobs give directly, for any split into micro-batches, and the
    metrics' reads from the device are one per step, not one per number and micro-batch."""
    model = copy.deepcopy(tiny_model).train()
    policy = adapter.policy(model, 1.0)
    with torch.no_grad():
        lp, ent = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    m = batch.loss_mask > 0
    d = (lp - batch.behavior_logprobs).double()[m]
    settings = AlgorithmConfig(entropy_coef=0.01)
    n = batch.size
    for groups in ([list(range(n))], [[0], [1, 2, 3, 4, 5, 6], [7]]):
        _, s = grads(policy, batch, groups, settings)
        assert s["tokens"] == int(m.sum())
        assert s["log_ratio_min"] == pytest.approx(min(0.0, float(d.min())), abs=1e-6)
        assert s["log_ratio_max"] == pytest.approx(max(0.0, float(d.max())), abs=1e-6)
        assert s["max_abs_diff"] == pytest.approx(float(d.abs().max()), abs=1e-6)
        assert s["log_ratio_sum"] == pytest.approx(float(d.sum()), abs=1e-5)
        assert s["entropy_sum"] == pytest.approx(float(ent[m].sum()), rel=1e-5)
        assert s["log_ratio_min"] < 0 < s["log_ratio_max"]  # (ratios != 1: the min and max are the tokens')
    # the reads of one step with 1 and with 3 micro-batches: the model's own (vision grids, packing) grow
    # with the micro-batches, the metrics' (~20 numbers each) must not
    counts = []
    for groups in ([list(range(n))], [[0, 1, 2], [3, 4, 5], [6, 7]]):
        policy.zero_grad(set_to_none=True)
        with HostReads() as reads:
            accumulate_gradients(policy, batch, groups, settings, 6)
        counts.append(reads.reads)
    assert counts[1] - counts[0] < 2 * 10, counts
