"""Logprobs of chosen tokens from hidden states, without full-vocabulary float32 logits for the whole batch.

Only the positions that are trained need logits (prompt and image tokens do not), and those are computed a
chunk of rows at a time: the lm_head product in the model's dtype, then float32 for the softmax, exactly as
the samplers do. Each chunk has its own backward (it recomputes its logits), so the backward pass keeps only
the hidden rows, never [N, V] logits.
"""

from __future__ import annotations

import torch


def _masked_logits(hidden, weight, inv_temperature, banned):
    logits = hidden @ weight.T  # [n, V] in the model's dtype, then at least float32 for the softmax
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if inv_temperature != 1.0:
        logits = logits * inv_temperature
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    return logits


def _entropy(logits: torch.Tensor, logz: torch.Tensor) -> torch.Tensor:
    probs = torch.exp(logits - logz[:, None])
    # Banned entries hold -inf with probability 0; 0 * -inf is nan, so they are zeroed explicitly.
    return logz - (probs * logits.masked_fill(probs == 0, 0.0)).sum(-1)  # [n]


class _LinearLogprob(torch.autograd.Function):
    """logprob of `targets` (and entropy) from hidden rows, with a backward of its own.

    The forward keeps nothing of the [n, V] logits; the backward recomputes them once and forms
    d logp / d logits = onehot - softmax (and, for an entropy bonus, -p * (log p + H)) directly, so a chunk
    costs one extra matmul and no saved float32 [n, V] tensors (autograd through log_softmax would keep
    several).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, banned):
        logits = _masked_logits(hidden, weight, inv_temperature, banned)
        logz = torch.logsumexp(logits, dim=-1)  # [n]
        chosen = logits.gather(-1, targets[:, None]).squeeze(-1) - logz  # [n]
        entropy = _entropy(logits, logz)
        ctx.save_for_backward(hidden, weight, targets, logz, entropy, banned)
        ctx.inv_temperature = inv_temperature
        return chosen, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, logz, entropy, banned = ctx.saved_tensors
        logits = _masked_logits(hidden, weight, ctx.inv_temperature, banned)
        probs = torch.exp(logits - logz[:, None])  # [n, V] softmax, 0 on banned tokens
        grad = probs * (-g_lp)[:, None]  # d lp / d logits = onehot - p
        grad.scatter_add_(-1, targets[:, None], g_lp[:, None])
        if g_ent is not None and bool(g_ent.any()):
            logp = (logits - logz[:, None]).masked_fill(probs == 0, 0.0)
            grad -= probs * (logp + entropy[:, None]) * g_ent[:, None]  # d H / d logits
        grad = (grad * ctx.inv_temperature).to(hidden.dtype)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None  # [n, H]
        grad_weight = grad.T @ hidden if ctx.needs_input_grad[1] else None  # [V, H]
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden: torch.Tensor,  # [N, H]: the hidden state that predicts each target
    weight: torch.Tensor,  # [V, H]: the output embedding (lm_head) weight
    targets: torch.Tensor,  # [N] int64
    temperature: float = 1.0,
    banned_ids: torch.Tensor | None = None,  # [k] int64: tokens the sampler can never produce
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logprob of `targets` under softmax(hidden @ weight.T / temperature), banned tokens excluded,
    and the entropy of that distribution (always computed: it costs one reduction over logits that exist).

    Returns (logprobs [N] float32, entropy [N] float32).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    inv_t = 1.0 / temperature
    banned = banned_ids if banned_ids is not None else torch.zeros(0, dtype=torch.long, device=hidden.device)
    outs, ents = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        lp, ent = _LinearLogprob.apply(
            hidden[start : start + chunk_size], weight, targets[start : start + chunk_size], inv_t, banned
        )
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-aligned logprobs: out[b, t] = log p(input_ids[b, t] | tokens < t) where mask[b, t], else 0.

    Returns (logprobs [B, L] float32, entropy [B, L] float32).
    """
    sel = mask.bool().clone()
    if sel[:, 0].any():
        raise ValueError("the first token of a sequence has no logprob; mask[:, 0] must be 0")
    b_idx, t_idx = sel.nonzero(as_tuple=True)  # [N], [N]
    lp, ent = token_logprobs(
        hidden[b_idx, t_idx - 1], weight, input_ids[b_idx, t_idx], temperature, banned_ids, chunk_size
    )
    out = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((b_idx, t_idx), lp)
    ent_out = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put((b_idx, t_idx), ent)
    return out, ent_out
