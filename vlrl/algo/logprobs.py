"""Logprobs of chosen tokens from hidden states, without full-vocabulary float32 logits for the whole batch.

Only the positions that are trained need logits (prompt and image tokens do not), and those are computed a
chunk of rows at a time: the lm_head product in the model's dtype, then float32 for the softmax, exactly as
the samplers do. Under autograd each chunk is checkpointed, so the backward pass keeps only the hidden rows,
never [N, V] logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(
    hidden: torch.Tensor,  # [n, H] model dtype
    weight: torch.Tensor,  # [V, H] model dtype
    targets: torch.Tensor,  # [n] int64
    inv_temperature: float,
    banned: torch.Tensor | None,  # [k] int64
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.T).float()  # [n, V] float32
    if inv_temperature != 1.0:
        logits = logits * inv_temperature
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    logz = torch.logsumexp(logits, dim=-1)  # [n]
    chosen = logits.gather(-1, targets[:, None]).squeeze(-1) - logz  # [n]
    if not with_entropy:
        return chosen, torch.zeros_like(chosen)
    probs = torch.softmax(logits, dim=-1)
    # Banned entries hold -inf with probability 0; 0 * -inf is nan, so they are zeroed explicitly.
    entropy = logz - (probs * logits.masked_fill(probs == 0, 0.0)).sum(-1)  # [n]
    return chosen, entropy


def token_logprobs(
    hidden: torch.Tensor,  # [N, H]: the hidden state that predicts each target
    weight: torch.Tensor,  # [V, H]: the output embedding (lm_head) weight
    targets: torch.Tensor,  # [N] int64
    temperature: float = 1.0,
    banned_ids: torch.Tensor | None = None,  # [k] int64: tokens the sampler can never produce
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logprob of `targets` under softmax(hidden @ weight.T / temperature), banned tokens excluded.

    Returns (logprobs [N] float32, entropy [N] float32; zeros unless `with_entropy`).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    inv_t = 1.0 / temperature
    outs, ents = [], []
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        if use_ckpt:
            lp, ent = checkpoint(_chunk_logprobs, h, weight, t, inv_t, banned_ids, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(h, weight, t, inv_t, banned_ids, with_entropy)
        outs.append(lp)
        ents.append(ent)
    return torch.cat(outs), torch.cat(ents)


def sequence_logprobs(
    hidden: torch.Tensor,  # [B, L, H]
    weight: torch.Tensor,  # [V, H]
    input_ids: torch.Tensor,  # [B, L] int64
    mask: torch.Tensor,  # [B, L]: positions whose token logprob is wanted (position 0 is never one)
    temperature: float = 1.0,
    banned_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-aligned logprobs: out[b, t] = log p(input_ids[b, t] | tokens < t) where mask[b, t], else 0.

    Returns (logprobs [B, L] float32, entropy [B, L] float32).
    """
    sel = mask.bool().clone()
    if sel[:, 0].any():
        raise ValueError("the first token of a sequence has no logprob; mask[:, 0] must be 0")
    b_idx, t_idx = sel.nonzero(as_tuple=True)  # [N], [N]
    lp, ent = token_logprobs(
        hidden[b_idx, t_idx - 1], weight, input_ids[b_idx, t_idx], temperature, banned_ids, chunk_size, with_entropy
    )
    out = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((b_idx, t_idx), lp)
    ent_out = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((b_idx, t_idx), ent)
    return out, ent_out
