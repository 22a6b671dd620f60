"""Policy losses and the one place the loss is normalised. Pure functions on [B, L] tensors.

Notation per trained token t of sample i: logp = log pi_theta(t) (the trainer, with grad), mu = the
sampler's (behavior) logprob, A_i the sample's advantage, r = exp(logp - mu) the importance ratio.

The ratio is taken against the *behavior* logprobs, so no separate "old logprob" pass is needed: on the
first update r = pi_theta / mu is exactly the truncated-importance-sampling correction of the
sampler/trainer mismatch (and of any staleness, e.g. one-step-off-policy rollouts). The ratio is truncated
on both sides of the objective: PPO's clip (1 - clip_low, 1 + clip_high; DAPO's clip-higher when
clip_high > clip_low, arXiv:2503.14476) and, for negative advantages, dual clip at `ratio_cap`
(arXiv:1912.09729), so a token the trainer finds far likelier than the sampler did cannot blow up the loss.
Tokens whose ratio is far out of range (above `mask_ratio` or below its inverse) are masked out entirely.

Decoupled corrections (`is_correction` = `tis` or `icepop`), for rollouts far from the trainer's weights
(stale asynchronous rollouts): the PPO ratio is taken against the trainer's own detached logprobs (the
"proximal" policy of decoupled PPO, arXiv:2110.00641; its value is 1 on vlrl's one update per batch, so the
objective's gradient is w * A * grad logp), and the sampler/trainer gap moves into a weight w = pi_theta / mu
with no gradient: truncated at `tis_cap` (TIS) or zeroed outside [`icepop_low`, `icepop_high`] (IcePop), per
token or per sequence (`is_level`).
"""

from __future__ import annotations

import math

import torch


def policy_loss(
    logprobs: torch.Tensor,  # [B, L] float32, trainer (with grad)
    behavior: torch.Tensor,  # [B, L] float32, sampler
    advantages: torch.Tensor,  # [B] float32
    mask: torch.Tensor,  # [B, L] float32, trained tokens
    # the algorithm's settings (config.AlgorithmConfig): policy_loss, clip_low/high, ratio_cap, mask_ratio
    settings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, L] (0 off the mask) and detached statistics (sums over tokens, for logging)."""
    kind, clip_low, clip_high = settings.policy_loss, settings.clip_low, settings.clip_high
    ratio_cap, mask_ratio = settings.ratio_cap, settings.mask_ratio
    correction = getattr(settings, "is_correction", "ratio")
    weight = None
    if correction != "ratio":
        weight, kept, truncated = importance_weights(logprobs.detach(), behavior, mask, settings)  # [B, L] each
        behavior = logprobs.detach()  # decoupled: the ratio against the trainer itself
    log_r = (logprobs - behavior) * mask  # [B, L]
    A = advantages[:, None]  # [B, 1]
    if kind == "token":
        log_ratio = log_r
        in_range = (log_r.detach().abs() <= math.log(mask_ratio)).float()
    elif kind == "sequence":
        # GSPO (arXiv:2507.18071): one length-normalised ratio per sequence, applied to all its tokens.
        n = mask.sum(-1).clamp(min=1)  # [B]
        seq = (log_r.sum(-1) / n)[:, None]  # [B, 1]
        log_ratio = seq.expand_as(log_r)
        in_range = (seq.detach().abs() <= math.log(mask_ratio)).float().expand_as(log_r)
    else:
        raise ValueError(f"unknown policy loss {kind!r}")
    ratio = torch.exp(log_ratio)
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * A
    objective = torch.minimum(unclipped, clipped)
    objective = torch.where(A < 0, torch.maximum(objective, ratio_cap * A), objective)  # dual clip
    if weight is not None:
        objective = objective * weight
        in_range = in_range * kept
    m = mask * in_range
    loss = -objective * m
    with torch.no_grad():
        clip_active = ((clipped < unclipped)
                       | ((A < 0) & (ratio_cap * A > torch.minimum(unclipped, clipped))))
        stats = {
            "clipped_tokens": (clip_active.float() * m).sum(),
            "masked_tokens": (mask * (1 - in_range)).sum(),
            "ratio_sum": (ratio.detach() * m).sum(),
        }
        if weight is not None:
            stats["truncated_tokens"] = (truncated * m).sum()
            stats["is_weight_sum"] = (weight * m).sum()
    return loss, stats


def importance_weights(
    logprobs: torch.Tensor,  # [B, L] trainer, detached
    behavior: torch.Tensor,  # [B, L] sampler
    mask: torch.Tensor,  # [B, L] trained tokens
    settings,  # is_correction ("tis" | "icepop"), is_level, tis_cap, icepop_low, icepop_high
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoupled corrections' weights w = pi_theta / mu, no gradient: (w [B, L], kept [B, L] 1/0, truncated
    [B, L] 1/0). TIS: w truncated at `tis_cap` (token ratio, or the product of the sequence's ratios). IcePop:
    w as it is inside [icepop_low, icepop_high] and kept = 0 outside (token ratio, or the sequence's geometric
    mean, which masks the whole sequence)."""
    log_w = (logprobs - behavior) * mask  # [B, L]
    ones = torch.ones_like(log_w)
    if settings.is_level == "sequence":
        total = log_w.sum(-1, keepdim=True)  # [B, 1]: log of the product of the token ratios
        n = mask.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
        log_w = (total if settings.is_correction == "tis" else total / n).expand_as(log_w)
    if settings.is_correction == "tis":
        cap = math.log(settings.tis_cap)
        truncated = (log_w > cap).float()
        return torch.exp(log_w.clamp(max=cap)), ones, truncated
    if settings.is_correction == "icepop":
        kept = ((log_w >= math.log(settings.icepop_low)) & (log_w <= math.log(settings.icepop_high))).float()
        w = torch.exp(log_w.clamp(math.log(settings.icepop_low), math.log(settings.icepop_high))) * kept
        return w, kept, torch.zeros_like(log_w)
    raise ValueError(f"unknown importance correction {settings.is_correction!r}")


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 for d = log(q / p) at samples of p: the k3 estimator of KL(p || q) per token; >= 0,
    unbiased (Schulman, "Approximating KL divergence")."""
    return torch.exp(log_ratio) - log_ratio - 1


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pi_theta || pi_ref) per token, k3-estimated at the policy's own samples."""
    return k3(ref_logprobs - logprobs)


def aggregation_weights(
    mask: torch.Tensor,  # [B, L] float32: trained tokens of this micro-batch
    kind: str,
    total_tokens: float,  # trained tokens in the whole step (all micro-batches, all ranks)
    total_sequences: float,  # sequences with at least one trained token in the whole step
    max_new_tokens: int,
) -> torch.Tensor:
    """Per-token weights [B, L] such that the step's loss is sum(token_loss * weights) over micro-batches.

    Normalising here, once, by global counts is what makes the objective independent of how the step is
    split into micro-batches and ranks.
    - token-mean: every trained token of the step weighs the same.
    - seq-mean-token-mean: each sequence's token mean, averaged over sequences.
    - constant: Dr.GRPO, sum over tokens / (sequences * max_new_tokens), no length bias (arXiv:2503.20783).
    """
    if kind == "token-mean":
        return mask / max(total_tokens, 1.0)
    if kind == "seq-mean-token-mean":
        per_seq = mask.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
        return mask / per_seq / max(total_sequences, 1.0)
    if kind == "constant":
        return mask / (max(total_sequences, 1.0) * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {kind!r}")
