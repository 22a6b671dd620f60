"""Logprobs of chosen tokens from hidden states, without full-vocabulary float32 logits for the whole batch.

Only the positions that are trained need logits (prompt and image tokens do not), and those are computed a
chunk of rows at a time: the lm_head product in the model's dtype, then float32 for the softmax, exactly as
the samplers do. Each chunk has its own backward (it recomputes its logits), so the backward pass keeps only
the hidden rows, never [N, V] logits; or, with `keep_logits`, it keeps each chunk's logits in the model's dtype
(N x V x 2 bytes in bf16) and skips that recompute (one lm_head product, ~2.7% of an 8B update's matrix work
per trained token). Either is exact: the kept logits are the bits a recompute produces.
"""

from __future__ import annotations

import torch


def _scores(logits, inv_temperature, bias):
    """Scores, at least float32: logits / temperature, banned tokens at -inf (bias: 0 or -inf per token)."""
    z = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if inv_temperature != 1.0:
        z = z * inv_temperature
    return z + bias if bias is not None else z


def _row_stats(logits, targets, inv_temperature, bias):
    """(logprob of each row's target, log-normaliser, entropy) of softmax(scores), per row."""
    z = _scores(logits, inv_temperature, bias)
    logz = torch.logsumexp(z, dim=-1)  # [n]
    chosen = z.gather(-1, targets[:, None]).squeeze(-1) - logz
    p = torch.exp(z - logz[:, None])
    # Banned entries hold -inf with probability 0; 0 * -inf is nan, so they are zeroed explicitly.
    entropy = logz - torch.where(p > 0, p * z, 0.0).sum(-1)
    return chosen, logz, entropy


def _row_grad(logits, targets, inv_temperature, bias, logz, entropy, g_lp, g_ent):
    """d(sum g_lp * logprob + sum g_ent * entropy) / d logits, in the logits' dtype."""
    z = _scores(logits, inv_temperature, bias)
    p = torch.exp(z - logz[:, None])  # softmax, 0 on banned tokens
    grad = p * (-g_lp)[:, None]  # d lp / d logits = onehot - p
    grad = grad.scatter_add(-1, targets[:, None], g_lp[:, None])
    if g_ent is not None:
        logp = torch.where(p > 0, z - logz[:, None], 0.0)
        grad = grad - p * (logp + entropy[:, None]) * g_ent[:, None]  # d H / d logits
    return (grad * inv_temperature).to(logits.dtype)


_COMPILED: dict = {}


def _kernels(fused: bool):
    """The row functions, eager or compiled (one fused pass over each chunk's logits instead of ~10)."""
    if not fused:
        return _row_stats, _row_grad
    if not _COMPILED:
        _COMPILED["stats"] = torch.compile(_row_stats, dynamic=True)
        _COMPILED["grad"] = torch.compile(_row_grad, dynamic=True)
    return _COMPILED["stats"], _COMPILED["grad"]


class _LinearLogprob(torch.autograd.Function):
    """logprob of `targets` (and entropy) from hidden rows, with a backward of its own.

    The forward keeps nothing of the [n, V] logits; the backward recomputes them once and forms
    d logp / d logits = onehot - softmax (and, for an entropy bonus, -p * (log p + H)) directly, so a chunk
    costs one extra matmul and no saved float32 [n, V] tensors (autograd through log_softmax would keep
    several). With `fused`, the float32 work on the logits is one compiled kernel per direction.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, bias, fused, keep_logits=False):
        stats, _ = _kernels(fused)
        logits = hidden @ weight.T  # [n, V] in the model's dtype
        chosen, logz, entropy = stats(logits, targets, inv_temperature, bias)
        ctx.save_for_backward(hidden, weight, targets, logz, entropy, bias, logits if keep_logits else None)
        ctx.inv_temperature, ctx.fused = inv_temperature, fused
        # an output the loss does not use (the entropy, without an entropy bonus) gets None, not zeros: its
        # term is skipped without looking at the gradient's values (a host read, one wait per chunk)
        ctx.set_materialize_grads(False)
        return chosen, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, logz, entropy, bias, logits = ctx.saved_tensors
        _, grad_fn = _kernels(ctx.fused)
        if g_lp is None:
            g_lp = torch.zeros_like(logz)
        logits = hidden @ weight.T if logits is None else logits
        grad = grad_fn(logits, targets, ctx.inv_temperature, bias, logz, entropy, g_lp, g_ent)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None  # [n, H]
        grad_weight = grad.T @ hidden if ctx.needs_input_grad[1] else None  # [V, H]
        return grad_hidden, grad_weight, None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,  # [N, H]: the hidden state that predicts each target
    weight: torch.Tensor,  # [V, H]: the output embedding (lm_head) weight
    targets: torch.Tensor,  # [N] int64
    temperature: float = 1.0,
    banned_ids: torch.Tensor | None = None,  # [k] int64: tokens the sampler can never produce
    chunk_size: int = 1024,
    fused: bool = False,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logprob of `targets` under softmax(hidden @ weight.T / temperature), banned tokens excluded,
    and the entropy of that distribution (always computed: it costs one reduction over logits that exist).

    Returns (logprobs [N] float32, entropy [N] float32).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    inv_t = 1.0 / temperature
    bias = None
    if banned_ids is not None and banned_ids.numel():
        bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device)
        bias.index_fill_(0, banned_ids.to(hidden.device), float("-inf"))
    outs, ents = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        lp, ent = _LinearLogprob.apply(
            hidden[start : start + chunk_size], weight, targets[start : start + chunk_size], inv_t, bias,
            fused, keep_logits,
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
    fused: bool = False,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-aligned logprobs: out[b, t] = log p(input_ids[b, t] | tokens < t) where mask[b, t], else 0.

    Returns (logprobs [B, L] float32, entropy [B, L] float32).
    """
    sel = mask.bool().clone()
    message = "the first token of a sequence has no logprob; mask[:, 0] must be 0"
    if sel.device.type != "cuda":
        if sel[:, 0].any():
            raise ValueError(message)
    else:  # checked on the GPU: a host read would make every micro-batch wait (the batch builders ensure it)
        torch._assert_async(~sel[:, 0].any(), message)
    b_idx, t_idx = sel.nonzero(as_tuple=True)  # [N], [N]
    lp, ent = token_logprobs(
        hidden[b_idx, t_idx - 1], weight, input_ids[b_idx, t_idx], temperature, banned_ids, chunk_size, fused,
        keep_logits,
    )
    out = hidden.new_zeros(mask.shape, dtype=lp.dtype).index_put((b_idx, t_idx), lp)
    ent_out = hidden.new_zeros(mask.shape, dtype=lp.dtype).index_put((b_idx, t_idx), ent)
    return out, ent_out
