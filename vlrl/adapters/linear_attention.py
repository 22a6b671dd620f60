"""Packed sequences through linear-attention layers (Qwen3.5's Gated DeltaNet): every sample's conv and
recurrent state start from zero at its first token.

A Gated DeltaNet layer carries two kinds of state along the sequence: a causal depthwise conv1d over the q/k/v
projections (kernel 4: each token mixes the three before it) and the gated delta rule's recurrent state (a
[heads, k_dim, v_dim] matrix updated at every token). In a packed micro-batch ([1, T], samples back to back)
both would carry the end of one sample into the start of the next unless each is told where samples begin.
transformers 5.19 hands the layer the boundaries as `cu_seq_lens_q` and forwards them to its kernels
(flash-linear-attention's `chunk_gated_delta_rule(cu_seqlens=...)`); its PyTorch fallbacks, which run wherever
those kernels are not installed (the CPU; a GPU without flash-linear-attention), drop them: the state leaks,
silently. `patch_linear_attention` replaces the two module-level functions the layer calls (the
same functions every layer of the model's module uses) with wrappers that honour the boundaries:

- conv1d: a packed call is computed as a sum of the kernel's K taps over the input shifted by 0..K-1 tokens,
  each tap masked off where it would reach before the token's own sample (`_packed_conv`): the same products
  as a conv over each sample alone, in one pass over [C, T], on any device;
- the delta rule: a kernel that takes `cu_seqlens` itself gets them; the PyTorch fallback runs on the samples
  re-padded to [n, L, heads, dim] (a batch of independent sequences, each right-padded: a causal recurrence
  never reads its padding) and packed again.

Without packing keywords both wrappers call the original function with the original arguments: padded batches,
generation and the in-process sampler are unchanged. The boundaries reach the layers through the language
model's packing pre-hook (`packing.py`: the `BOUNDARIES` keyword, on every route). `tests/test_qwen3_5.py`
checks packed == padded for logprobs and gradients, and that the packed result changes when the boundaries are
withheld (state leaking across samples).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from vlrl.adapters.fla_hopper import register_backend

# the packing keyword every linear-attention layer reads: (cu_seqlens [n + 1] int32, doc [T], within [T],
# longest sample); built once per forward by packing.attention_kwargs
BOUNDARIES = "vlrl_linear_boundaries"


def has_linear_attention(language_model: nn.Module) -> bool:
    """Whether the language model holds linear-attention layers (Qwen3.5: `layer_types`)."""
    return "linear_attention" in (getattr(language_model.config, "layer_types", None) or ())


def patch_linear_attention(language_model: nn.Module) -> bool:
    """Make the conv1d and delta-rule functions of `language_model`'s linear-attention layers honour packed
    sample boundaries. Idempotent (per transformers module); returns whether the model has such layers."""
    layers = [layer.linear_attn for layer in language_model.layers if hasattr(layer, "linear_attn")]
    if not layers:
        return False
    # modeling_qwen3_5 (or qwen3_5_moe): the names its forward calls
    module_globals = vars(sys.modules[type(layers[0]).__module__])
    if module_globals.get("_vlrl_linear_packing"):
        return True
    register_backend()  # fla's gated backward on Hopper with torch <= 2.11's Triton (fla_hopper.py)
    module_globals["causal_conv1d_fn"] = _conv_with_boundaries(module_globals["causal_conv1d_fn"])
    bound = module_globals["torch_chunk_gated_delta_rule"]
    module_globals["torch_chunk_gated_delta_rule"] = _rule_with_boundaries(bound, _takes_cu_seqlens(bound),
                                                                           bound)
    module_globals["_vlrl_linear_packing"] = True
    return True


def set_delta_rule(language_model: nn.Module, kernel: str) -> None:
    """Choose the chunked gated delta rule every linear-attention layer of `language_model`'s module runs:
    `torch` (transformers' PyTorch reference, packed samples re-padded), `fla` (flash-linear-attention's
    Triton `chunk_gated_delta_rule`, packed samples by `cu_seqlens`; on Hopper with Triton < 3.7.1 one of
    its backward kernels is vlrl's, `fla_hopper.py`), or `transformers` (what transformers
    bound at import: fla when importable, else the reference). For benches and users who must pick; models
    keep transformers' choice otherwise."""
    patch_linear_attention(language_model)
    layer = next(layer.linear_attn for layer in language_model.layers if hasattr(layer, "linear_attn"))
    module_globals = vars(sys.modules[type(layer).__module__])
    bound = module_globals["torch_chunk_gated_delta_rule"]._vlrl_bound  # transformers' own wrapper
    if kernel == "transformers":
        chosen, native = bound, _takes_cu_seqlens(bound)
    elif kernel == "torch":
        chosen, native = bound.__wrapped__, False  # (functools.wraps: the reference function itself)
    elif kernel == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        register_backend()

        def chosen(query, key, value, g, beta, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
            return chunk_gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

        native = True
    else:
        raise ValueError(f"unknown delta-rule kernel {kernel!r} (torch, fla, transformers)")
    module_globals["torch_chunk_gated_delta_rule"] = _rule_with_boundaries(chosen, native, bound)


def boundaries(cu_seqlens: torch.Tensor, doc: torch.Tensor, max_seqlen: int, total: int) -> tuple:
    """The `BOUNDARIES` keyword: boundaries, each token's sample and its place in it."""
    within = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[doc]  # [T]
    return cu_seqlens, doc, within, max_seqlen


def _conv_with_boundaries(original):
    @functools.wraps(original)
    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        packed = kwargs.pop(BOUNDARIES, None)
        if packed is None:
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        return _packed_conv(hidden_states, weight, bias, activation, packed[2])

    return conv


def _packed_conv(x: torch.Tensor,  # [1, C, T]
                 weight: torch.Tensor,  # [C, K]
                 bias: torch.Tensor | None, activation: str | None,
                 within: torch.Tensor,  # [T] each token's place in its sample
                 ) -> torch.Tensor:
    """Causal depthwise conv1d over packed samples, each from a zero state: out[t] = sum_j w[K-1-j] x[t-j]
    over the taps j with t - j in t's own sample. [1, C, T] in, [1, C, T] out (activation applied), in x's
    dtype. The taps are summed in float32, as a bf16 conv1d kernel accumulates. (With bf16 sums, the packed
    bf16 update on an H200 was 6x further from the padded one than bf16's own noise: grad rel err 0.20 against
    0.036; whether these taps were the cause was not isolated, this change not re-measured there.)

    Computed token-major: the layer hands in its q/k/v projection [1, T, C] transposed, and takes the result
    back transposed, so [1, T, C] is both tensors' own layout. Summed over [1, C, T] instead, the gradient
    reaching the projection was [C, T] (leading dimension T): for a T not a multiple of 8, both products of
    that projection's backward lost 16-byte alignment, which sends cuBLAS to its align1 kernels (the H200
    profile of the 9B's packed update spent 12.5% in sm75 `..._align1` kernels, 96 calls a step: most likely
    these, not yet re-profiled). `tests/test_qwen3_5.py` checks every product's operands."""
    K = weight.shape[-1]
    T = x.shape[-1]
    dtype, acc = x.dtype, torch.promote_types(x.dtype, torch.float32)  # (float64 stays float64)
    x, weight = x.transpose(1, 2).to(acc), weight.to(acc).T  # [1, T, C], [K, C]
    bias = None if bias is None else bias.to(acc)
    out = x * weight[K - 1]  # tap j = 0 (a token always sees itself)
    for j in range(1, K):
        shifted = F.pad(x, (0, 0, j, 0))[:, :T]  # x[t - j], 0 before the sequence
        out = out + shifted * weight[K - 1 - j] * (within >= j).to(x.dtype)[:, None]
    if bias is not None:
        out = out + bias
    if activation is not None:
        from transformers.activations import ACT2FN

        out = ACT2FN[activation](out)
    return out.to(dtype).transpose(1, 2)


def _takes_cu_seqlens(original) -> bool:
    """Whether transformers' kernel wrapper forwards `cu_seqlens` to its implementation (flash-linear-
    attention's chunk kernel takes them; the PyTorch fallback does not, and the wrapper drops them)."""
    names = getattr(getattr(original, "__code__", None), "co_freevars", ())
    if "applicable_params" not in names:
        return False
    cell = original.__closure__[names.index("applicable_params")]
    return "cu_seqlens" in cell.cell_contents


def _rule_with_boundaries(original, native: bool, bound):
    """`original` (the delta rule), taking packed boundaries as `cu_seqlens` when `native`, else run on the
    samples re-padded. `bound`: transformers' own function, kept to choose again (`set_delta_rule`)."""

    def rule(query, key, value, g, beta, *args, cu_seqlens=None, **kwargs):
        packed = kwargs.pop(BOUNDARIES, None)
        if packed is None:
            return original(query, key, value, g, beta, *args, cu_seqlens=cu_seqlens, **kwargs)
        cu, doc, within, longest = packed
        if native:
            return original(query, key, value, g, beta, *args, cu_seqlens=cu, **kwargs)
        n = cu.numel() - 1

        def padded(t):  # [1, T, ...] -> [n, L, ...], zeros after each sample
            out = t.new_zeros(n, longest, *t.shape[2:])
            return out.index_put((doc, within), t[0])

        out, state = original(*(padded(t) for t in (query, key, value, g, beta)), *args, **kwargs)
        return out[doc, within][None], state  # [1, T, heads, v_dim]

    # compiled layers run it eagerly: fla's kernels are Triton already (its backend dispatch refuses tracing),
    # and the reference's Python loop over chunks would recompile for every new sequence length
    rule = torch.compiler.disable(rule)
    rule._vlrl_bound = bound
    return rule
