"""Advantages and losses against values derived by hand."""

import math

import pytest
import torch

from vlrl.algo.advantages import group_advantages, zero_variance_groups
from vlrl.algo.losses import aggregation_weights, kl_k3, policy_loss
from vlrl.config import AlgorithmConfig

E = math.e


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_grpo_mean_baseline_with_and_without_std():
    r, g = t(1, 0, 0, 1), torch.tensor([0, 0, 0, 0])
    assert group_advantages(r, g, "grpo", std_normalize=False).tolist() == [0.5, -0.5, -0.5, 0.5]
    # unbiased std of [1, 0, 0, 1] = sqrt((4 * 0.25) / 3) = 0.57735; 0.5 / 0.57735 = 0.866025
    a = group_advantages(r, g, "grpo", std_normalize=True)
    torch.testing.assert_close(a, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5, rtol=0)


def test_rloo_leave_one_out_baseline():
    a = group_advantages(t(1, 0, 0, 1), torch.tensor([0, 0, 0, 0]), "rloo", std_normalize=False)
    # sample 0: 1 - (0 + 0 + 1) / 3 = 2/3; sample 1: 0 - (1 + 0 + 1) / 3 = -2/3
    torch.testing.assert_close(a, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_groups_are_independent_and_failed_samples_are_left_out():
    r = t(1, math.nan, 0, 3, 3, 5, 7)
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    a = group_advantages(r, g, "grpo", std_normalize=False)
    # group 0: valid [1, 0], mean 0.5; the NaN sample gets 0. group 1: no variance. group 2: mean 6.
    assert a.tolist() == [0.5, 0.0, -0.5, 0.0, 0.0, -1.0, 1.0]
    assert group_advantages(t(1, math.nan), torch.tensor([0, 0]), "grpo").tolist() == [0.0, 0.0]  # one valid
    assert zero_variance_groups(r, g) == {1}


def loss_of(log_r, adv, kind="token", **kw):
    """The loss with the config's defaults, changed by `kw` (AlgorithmConfig fields)."""
    behavior = torch.zeros(1, len(log_r), dtype=torch.float64)
    logp = torch.tensor([log_r], dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(behavior)
    loss, stats = policy_loss(logp, behavior, torch.tensor([adv], dtype=torch.float64), mask,
                              AlgorithmConfig(policy_loss=kind, **kw))
    loss.sum().backward()
    return loss.detach()[0].tolist(), logp.grad[0].tolist(), stats


def test_token_loss_clip_high_with_positive_advantage():
    # ratio e, A = +1, clip_high 0.2: min(e * 1, 1.2 * 1) = 1.2 -> loss -1.2 and no gradient (clipped)
    loss, grad, stats = loss_of([1.0], 1.0, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx([-1.2]) and grad == [0.0]
    assert stats["clipped_tokens"] == 1


def test_token_loss_unclipped_branches():
    # ratio 1, A = 0.5: loss -0.5, d loss / d logp = -A * ratio = -0.5
    loss, grad, _ = loss_of([0.0], 0.5)
    assert loss == pytest.approx([-0.5]) and grad == pytest.approx([-0.5])
    # ratio e^-1 = 0.3679 below 1 - clip_low = 0.8 with A = +1: the unclipped term is the min, gradient flows
    loss, grad, stats = loss_of([-1.0], 1.0, clip_low=0.2)
    assert loss == pytest.approx([-math.exp(-1)]) and grad == pytest.approx([-math.exp(-1)])
    assert stats["clipped_tokens"] == 0


def test_token_loss_negative_advantage_and_dual_clip():
    # ratio e, A = -1: min(-e, -1.2) = -e -> loss e, under the cap 3
    loss, grad, _ = loss_of([1.0], -1.0, clip_high=0.2, ratio_cap=3.0)
    assert loss == pytest.approx([E]) and grad == pytest.approx([E])
    # with cap 2: max(-e, 2 * -1) = -2 -> loss 2, no gradient
    loss, grad, stats = loss_of([1.0], -1.0, clip_high=0.2, ratio_cap=2.0)
    assert loss == pytest.approx([2.0]) and grad == [0.0] and stats["clipped_tokens"] == 1
    # ratio e^-1 with A = -1: min(-0.3679, -0.8) = -0.8 -> loss 0.8 (clipped at 1 - clip_low)
    loss, grad, _ = loss_of([-1.0], -1.0, clip_low=0.2)
    assert loss == pytest.approx([0.8]) and grad == [0.0]


def test_tokens_far_out_of_range_are_masked():
    # log ratio 3 (ratio 20) > log 10: masked; log ratio 0 kept
    loss, grad, stats = loss_of([3.0, 0.0], 1.0, mask_ratio=10.0)
    assert loss == pytest.approx([0.0, -1.0]) and grad == pytest.approx([0.0, -1.0])
    assert stats["masked_tokens"] == 1


def test_sequence_level_ratio_gspo():
    # log ratios [0.2, -0.1] -> sequence log ratio 0.05, s = e^0.05 = 1.051271, inside [0.8, 1.28]
    loss, grad, _ = loss_of([0.2, -0.1], 1.0, kind="sequence", clip_low=0.2, clip_high=0.28)
    s = math.exp(0.05)
    assert loss == pytest.approx([-s, -s])
    # d/d logp_t of sum over both tokens of -s = -2 * s * (1/2) = -s
    assert grad == pytest.approx([-s, -s])
    # clipped as a whole: log ratios [1, 1] -> s = e > 1.28 with A > 0: no gradient
    loss, grad, _ = loss_of([1.0, 1.0], 1.0, kind="sequence", clip_high=0.28)
    assert loss == pytest.approx([-1.28, -1.28]) and grad == [0.0, 0.0]


def test_truncated_importance_sampling_token_level():
    # decoupled: the PPO ratio is against the trainer itself (value 1), each token weighted by w = pi / mu
    # truncated at tis_cap 2. log ratios [log 5, log 1.5], A = +1: w = [2 (5 truncated), 1.5]
    loss, grad, stats = loss_of([math.log(5.0), math.log(1.5)], 1.0, is_correction="tis", tis_cap=2.0)
    assert loss == pytest.approx([-2.0, -1.5]) and grad == pytest.approx([-2.0, -1.5])
    assert stats["truncated_tokens"] == 1 and stats["is_weight_sum"] == pytest.approx(3.5)
    # the clip never bites (ratio 1): a ratio of e with clip_high 0.2 still has its gradient, weight 2
    loss, grad, stats = loss_of([1.0], 1.0, is_correction="tis", clip_high=0.2)
    assert grad == pytest.approx([-2.0]) and stats["clipped_tokens"] == 0


def test_truncated_importance_sampling_sequence_level():
    # product of the token ratios: 1.2 * 1.5 = 1.8 < cap 2, every token weighted 1.8; A = -1
    loss, grad, stats = loss_of([math.log(1.2), math.log(1.5)], -1.0, is_correction="tis", is_level="sequence")
    assert loss == pytest.approx([1.8, 1.8]) and grad == pytest.approx([1.8, 1.8])
    assert stats["truncated_tokens"] == 0
    # 1.5 * 1.5 = 2.25 > 2: truncated to 2 on both tokens
    loss, _, stats = loss_of([math.log(1.5), math.log(1.5)], 1.0, is_correction="tis", is_level="sequence")
    assert loss == pytest.approx([-2.0, -2.0]) and stats["truncated_tokens"] == 2


def test_icepop_masks_tokens_outside_the_band():
    # band [0.5, 2]: ratio 5 masked (no loss, no gradient), 1.5 weighted 1.5, 0.25 masked
    loss, grad, stats = loss_of([math.log(5.0), math.log(1.5), math.log(0.25)], 1.0, is_correction="icepop")
    assert loss == pytest.approx([0.0, -1.5, 0.0]) and grad == pytest.approx([0.0, -1.5, 0.0])
    assert stats["masked_tokens"] == 2
    # sequence level: geometric mean of 3 and 1/3 is 1, inside the band: both tokens kept, weight 1
    loss, _, stats = loss_of([math.log(3.0), math.log(1 / 3)], 1.0, is_correction="icepop", is_level="sequence")
    assert loss == pytest.approx([-1.0, -1.0]) and stats["masked_tokens"] == 0
    # geometric mean of 3 and 3: outside, the whole sequence masked
    loss, _, stats = loss_of([math.log(3.0), math.log(3.0)], 1.0, is_correction="icepop", is_level="sequence")
    assert loss == pytest.approx([0.0, 0.0]) and stats["masked_tokens"] == 2


def test_aggregation_weights():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregation_weights(mask, "token-mean", 4,
                               2, 4).tolist() == [[0.25, 0.25, 0.25, 0], [0.25, 0, 0, 0]]
    torch.testing.assert_close(
        aggregation_weights(mask, "seq-mean-token-mean", 4, 2, 4),
        torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [0.5, 0, 0, 0]])
    )
    assert aggregation_weights(mask, "constant", 4,
                               2, 4).tolist() == [[0.125, 0.125, 0.125, 0], [0.125, 0, 0, 0]]


def test_kl_k3():
    # p = 0.5, p_ref = 0.25: d = log(0.5) -> 0.5 - log(0.5) - 1 = 0.193147
    v = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert v.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
