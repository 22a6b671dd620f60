"""Packed sequences through Qwen3-VL's language model: one [1, T] sequence, attention kept within each sample.

A packed micro-batch concatenates its samples' tokens into one sequence of T = sum of their lengths and
computes no padding (`vlrl.batch.PackedBatch`). What keeps the samples apart:
- M-RoPE positions per sample (each sample's own, from `mrope.py`, concatenated: what `get_rope_index`
  gives for that sample alone);
- linear-attention layers (Qwen3.5's Gated DeltaNet), if any, restart their conv and recurrent state at each
  sample's first token (`linear_attention.py`: the `BOUNDARIES` keyword, on every route);
- attention within each sample, causal, by one of three routes (`model.packed_attention`):
  - `varlen`: `torch.nn.attention.varlen.varlen_attn` (flash kernel on CUDA, bf16/fp16) over the
    boundaries `cu_seqlens`. Measured on an H200 (ENVIRONMENT.md): 32 ragged 8B-shaped documents 1.56 ms
    against 2.54 ms for sdpa on the same documents padded. torch 2.11 has no `enable_gqa` there (k/v are
    repeated to the query heads), 2.14 has;
  - `flex`: FlexAttention with a document mask (a `BlockMask` built once per forward; compiled on CUDA);
  - `sdpa`: sdpa over the attention inputs re-padded per sample ([n, heads, L, dim], L the longest sample,
    a causal mask within each sample's length), then packed again: the projections and MLPs stay packed, only
    attention computes a padded square per sample (n L^2, not T^2: a block-diagonal [T, T] mask was 5x slower
    on the CPU demo's 128-sample micro-batches). The route for the CPU (tests, the demo).
  `auto` is `varlen` on CUDA in bf16/fp16, `flex` on CUDA in float32, `sdpa` on the CPU.

How the boundaries reach the attention: transformers' language model forwards its keyword arguments to
every decoder layer and on to the attention function. `patch_language_model` registers `packed_attention`
under the name `NAME` (with sdpa's own mask function) and makes it the language model's attention; with no
packing keywords it is transformers' sdpa, called with the same arguments, so the padded path (and the
in-process sampler's generation) is unchanged. `packed_sequences` hands the keywords to the language model
only (a pre-hook adds them to its call, built there from the input embeddings' device and dtype): passed to
`Qwen3VLModel.forward` they would also reach the vision tower, whose attention takes keywords of the same
names. They ride along the decoder layer's arguments, so a checkpointed layer recomputes with the same
boundaries.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# the sdpa route's keyword: (sample [T], position in it [T], mask [n, 1, L, L])
PADDED_SDPA = "vlrl_padded_sdpa"
# the language model's attention once patched (no "flash" in it: that name routes differently)
NAME = "vlrl_packed_sdpa"
ROUTES = ("varlen", "flex", "sdpa")


def patch_language_model(language_model: nn.Module) -> bool:
    """Make `packed_attention` the attention of `language_model` (sdpa models only). Idempotent; returns
    whether the model can run packed micro-batches."""
    config = language_model.config
    if getattr(language_model, "_vlrl_packing", None) is not None:
        return True
    if config._attn_implementation != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _SDPA["forward"] = sdpa_attention_forward  # read by packed_attention, which may be traced by dynamo
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches get exactly sdpa's masks
    config._attn_implementation = NAME
    from .linear_attention import patch_linear_attention

    # linear-attention layers (Qwen3.5's Gated DeltaNet) get the boundaries too (linear_attention.py)
    language_model._vlrl_packing = {"request": None, "linear": patch_linear_attention(language_model)}
    language_model.register_forward_pre_hook(_add_packing_kwargs, with_kwargs=True)
    return True


def packing_unavailable(model: nn.Module) -> str | None:
    """Why `model` (a Qwen3-VL model) cannot run packed micro-batches, in one line; None when it can."""
    lm = model.model.language_model
    if getattr(lm, "_vlrl_packing", None) is not None:
        return None
    impl = lm.config._attn_implementation
    return (f"model.attn_implementation = {impl!r}: packed micro-batches route attention through "
            "sdpa/varlen/flex kernels of their own, so this model trains on padded micro-batches (use 'sdpa' "
            "to pack)")


def resolve_route(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention route for packed sequences: `requested`, or the best one for `device`/`dtype`
    (`auto`)."""
    if requested != "auto":
        if requested == "varlen" and (device.type != "cuda" or _varlen_attn() is None):
            raise ValueError("model.packed_attention = 'varlen' needs a CUDA device and torch >= 2.10 "
                             "(torch.nn.attention.varlen)")
        return requested
    if device.type == "cuda":
        return "varlen" if dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None else "flex"
    return "sdpa"


def attention_kwargs(route: str, cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> dict:
    """The keywords that make the language model's attention stay within each packed sample.

    cu_seqlens [n + 1] int32 on the model's device; built once per forward, shared by every layer."""
    if route == "varlen":
        # transformers' own names for varlen boundaries (its flash-attention integration reads the same)
        return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_seqlen,
                "max_length_k": max_seqlen}
    doc = _document_ids(cu_seqlens, total)  # [T]
    if route == "flex":
        def same_sample_causal(b, h, q, kv):
            return (doc[q] == doc[kv]) & (q >= kv)

        # a 4-D mask passes through transformers' mask creation as it is, to every layer
        mask = create_block_mask(same_sample_causal, None, None, total, total, device=cu_seqlens.device,
                                 _compile=cu_seqlens.device.type == "cuda")
        return {"attention_mask": mask}
    if route == "sdpa":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [n]
        within = (torch.arange(total, device=cu_seqlens.device)
                  - cu_seqlens[:-1].long()[doc])  # [T] place in its sample
        width = torch.arange(max_seqlen, device=cu_seqlens.device)
        mask = ((width[None, :] <= width[:, None])[None]
                & (width[None, None, :] < lengths[:, None, None]))  # [n, L, L]
        return {PADDED_SDPA: (doc, within, mask[:, None])}
    raise ValueError(f"unknown packed attention route {route!r} (one of {', '.join(ROUTES)})")


@contextmanager
def packed_sequences(language_model: nn.Module, route: str, cu_seqlens: torch.Tensor | None,
                     max_seqlen: int | None):
    """Within the block, every call of `language_model` attends within the samples that `cu_seqlens` [n + 1]
    (int32, on the model's device) delimits in its [1, T] input, by `route` (`auto`: chosen by the device and
    dtype of the input embeddings, i.e. the compute dtype, bf16 under FSDP2's mixed precision too). No
    `cu_seqlens`: nothing changes."""
    if cu_seqlens is None:
        yield
        return
    state = getattr(language_model, "_vlrl_packing", None)
    if state is None:
        raise ValueError("a packed micro-batch for a model without packed attention: "
                         "packing_unavailable(model) says why; plan padded micro-batches for it")
    state["request"] = (route, cu_seqlens, max_seqlen)
    try:
        yield
    finally:
        state["request"] = None


def _add_packing_kwargs(module, args, kwargs):
    """The language model's pre-hook: the attention keywords of the packed request, if any."""
    request = module._vlrl_packing["request"]
    if request is None:
        return None
    route, cu_seqlens, max_seqlen = request
    embeds = kwargs["inputs_embeds"]  # [1, T, H] (Qwen3VLModel passes embeddings, never ids)
    route = resolve_route(route, embeds.device, embeds.dtype)
    total = embeds.shape[1]
    extra = attention_kwargs(route, cu_seqlens, max_seqlen, total)
    if module._vlrl_packing["linear"]:
        from .linear_attention import BOUNDARIES, boundaries

        extra[BOUNDARIES] = boundaries(cu_seqlens, _document_ids(cu_seqlens, total), max_seqlen, total)
        if "attention_mask" in extra:  # (a hybrid model takes its masks per layer type)
            extra["attention_mask"] = {"full_attention": extra["attention_mask"], "linear_attention": None}
    return args, {**kwargs, **extra}


def _document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the sample each packed token belongs to (no host read: `output_size` is known)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts,
                                   output_size=total)


_SDPA: dict = {}
_VARLEN: dict = {}


def _varlen_attn():
    """torch's varlen attention (None without it) and the keywords this torch's takes: `enable_gqa` (2.14, not
    2.11), causality as `window_size=(-1, 0)` (2.11, 2.14) or `is_causal` (2.9), `scale`. Looked up eagerly
    (`resolve_route`), before any compiled layer reads `_VARLEN`."""
    if "fn" not in _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        params = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
        _VARLEN.update(fn=varlen_attn, gqa="enable_gqa" in params, scale="scale" in params,
                       causal={"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    return _VARLEN["fn"]


_FLEX: dict = {}


def _flex_attention(device: torch.device):
    """FlexAttention; compiled on CUDA outside a compiled region (eager it materialises every score)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention)
    return _FLEX["compiled"]


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, T, dim] (or [B, heads, L, dim] for a padded batch)
    key: torch.Tensor,  # [1, kv_heads, T, dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,  # [n + 1] int32: the varlen route's sample boundaries
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The language model's attention: varlen over packed samples, FlexAttention with a document mask, sdpa
    per sample (packed, re-padded for attention only), or transformers' sdpa (padded batches). Returns
    [B, T, heads, dim]."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if cu_seq_lens_q is not None:
        varlen = _VARLEN["fn"]
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
        extra = {}
        if heads != kv_heads:
            if _VARLEN["gqa"]:
                extra["enable_gqa"] = True
            else:  # torch 2.11: query head h reads kv head h // groups, as transformers' repeat_kv
                k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        if _VARLEN["scale"]:
            extra["scale"] = scaling
        elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
            raise ValueError("this torch's varlen_attn takes no scale; use model.packed_attention = 'flex'")
        out = varlen(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                     **_VARLEN["causal"], **extra)
        return out[None], None  # [1, T, heads, dim]
    if PADDED_SDPA in kwargs:
        doc, within, mask = kwargs.pop(PADDED_SDPA)

        def padded(t):  # [1, h, T, d] -> [n, h, L, d]
            out = t.new_zeros(mask.shape[0], mask.shape[-1], t.shape[1], t.shape[3])
            return out.index_put((doc, within), t[0].transpose(0, 1)).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            padded(query), padded(key), padded(value), attn_mask=mask, dropout_p=dropout, scale=scaling,
            enable_gqa=heads != kv_heads)  # [n, h, L, d]
        return out.transpose(1, 2)[doc, within][None], None  # [1, T, heads, dim]
    if isinstance(attention_mask, BlockMask):
        flex = _flex_attention(query.device)
        out = flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=heads != kv_heads)
        return out.transpose(1, 2).contiguous(), None
    return _SDPA["forward"](module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, **kwargs)
