"""A sparse MLP's experts as grouped matrix products, with a permutation whose backward scatters nothing.

Each of the T tokens goes to k experts: S = T * k token-expert rows, sorted by expert so that every expert's
rows are one contiguous group of one grouped matrix product per projection. transformers' `grouped_mm`
experts gather the rows with advanced indexing (`hidden_states[perm // k]`) and put them back with another
(`out[inv_perm]`); the backward of each is an `index_put` with accumulation, a sort and atomic adds on the GPU
that seemed to take more time than the grouped products themselves in a profile (README: it did not). Here
both moves are gathers in both directions, since the permutation is known:
- dispatch: rows = x[token(perm)]; its backward gathers the rows' gradients back into token order through the
  inverse permutation and sums each token's k rows (every token is in exactly k rows), in float32;
- combine: out[t] = sum_j w[t, j] * rows[inv(t, j)]; its backward works in expert order, gathering each
  row's token's output gradient (the rows' gradient is that times the row's weight; the weight's gradient its
  dot product with the row).
Same operations and rounding points as transformers' forward otherwise (SwiGLU on the gate/up halves, the
routing weights applied in the model's dtype, the k-sum accumulated in float32), so logprobs and gradients
match it to the dtype's noise and in float64 (where grouped_mm has no CPU kernel: a loop over the experts'
groups) to rounding.

Registered as transformers' experts implementation "vlrl" (`model.experts_implementation = "vlrl"`). Not the
default: on an H100 vlrl's update with it was only 1.04x the naive update with transformers' grouped_mm; the
24% the permutation seemed to cost was the checkpointed layer's recomputation, which a profile sorted by
totals with children charges to the block's last op (bench/moe_experts.py times the two alone). Layouts other
than Qwen3-VL-MoE's (biases, no gate, interleaved gate/up) use transformers' `grouped_mm` forward.
"""

from __future__ import annotations

import torch

NAME = "vlrl"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Sums in float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class _Dispatch(torch.autograd.Function):
    """x [T, H] -> x[src] [S, H] (src: the token of each sorted row). Backward: the rows' gradients in
    token order (`inv`: the sorted row of each token-expert pair t * k + j), summed over each token's k."""

    @staticmethod
    def forward(ctx, x, src, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad_rows):
        (inv,) = ctx.saved_tensors
        g = grad_rows.index_select(0, inv).view(-1, ctx.k, grad_rows.shape[-1])
        return g.sum(1, dtype=_acc(g.dtype)).to(grad_rows.dtype), None, None, None


class _Combine(torch.autograd.Function):
    """rows [S, H] (sorted by expert), w [T, k] -> out [T, H], out[t] = sum_j w[t, j] * rows[inv[t * k + j]]
    (products in the rows' dtype, summed with float32 accumulation, as transformers does). Backward, in
    expert order: the output gradient gathered to each row's token, times the row's weight (the rows'
    gradient), and its dot product with the row (the weight's gradient): no [T, k, H] product is formed in
    the backward."""

    @staticmethod
    def forward(ctx, rows, w, perm, inv):
        ctx.save_for_backward(rows, w, perm, inv)
        t, k = w.shape
        pairs = rows.index_select(0, inv).view(t, k, -1)
        return (pairs * w.unsqueeze(-1)).sum(1)

    @staticmethod
    def backward(ctx, grad_out):
        rows, w, perm, inv = ctx.saved_tensors
        t, k = w.shape
        grad_src = grad_out.index_select(0, perm // k)  # [S, H]: each sorted row's token's output gradient
        grad_rows = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad_src * w.reshape(-1).index_select(0, perm).unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            dots = (rows * grad_src).sum(-1, dtype=_acc(rows.dtype))  # [S], in expert order
            grad_w = dots.index_select(0, inv).view(t, k).to(w.dtype)
        return grad_rows, grad_w, None, None


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, counts: list[int] | None,
                    transposed: bool) -> torch.Tensor:
    """x [S, in] (rows grouped by expert, group e ending at ends[e]) times each group's expert matrix
    (weight [E, out, in], or [E, in, out] when `transposed`)."""
    w = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    if counts is None:
        return torch.nn.functional.grouped_mm(x, w, offs=ends) if hasattr(torch.nn.functional, "grouped_mm") \
            else torch._grouped_mm(x, w, offs=ends)
    parts, start = [], 0
    for e, n in enumerate(counts):  # no grouped kernel for this dtype/device: one product per expert
        parts.append(x[start:start + n] @ w[e])
        start += n
    return torch.cat(parts)


def _has_grouped_kernel(x: torch.Tensor) -> bool:
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # (Inductor's grouped_mm: bfloat16 only)
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0) and x.dtype != torch.float64
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def sorted_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward signature: hidden_states [T, H], top_k_index / top_k_weights [T, k]."""
    if getattr(self, "has_bias", False) or not getattr(self, "has_gate", True) \
            or not getattr(self, "is_concatenated", True) or getattr(self, "_is_expert_parallel", False):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.shape[1]
    experts = top_k_index.reshape(-1)
    perm = torch.argsort(experts, stable=True)  # sorted row -> token-expert pair t * k + j
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)  # pair -> sorted row
    counts = torch.zeros(self.num_experts, dtype=torch.int64, device=experts.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))  # (a static shape, unlike bincount's)
    per_expert = None if _has_grouped_kernel(hidden_states) else counts.tolist()
    ends = counts.cumsum(0).to(torch.int32)
    rows = _Dispatch.apply(hidden_states, perm // k, inv, k)
    up = _grouped_linear(rows, self.gate_up_proj, ends, per_expert, self.is_transposed)
    down = _grouped_linear(self._apply_gate(up), self.down_proj, ends, per_expert, self.is_transposed)
    return _Combine.apply(down, top_k_weights.to(down.dtype), perm, inv).to(hidden_states.dtype)


def register() -> None:
    """Make "vlrl" an experts implementation transformers accepts (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, sorted_experts_forward)
