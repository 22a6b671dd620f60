"""flash-linear-attention's gated delta rule on Hopper GPUs with Triton 3.4 .. 3.7.0 (torch <= 2.11's): one
backward kernel replaced, so the rest of fla's kernels run there and its gradients are right.

fla 0.6.0 refuses gated `chunk_bwd_dqkwg` on Hopper with those Tritons (fla#640: the kernel transposes a
matmul result held in registers, `tl.trans(b_ds)`, and Triton miscompiles it: wrong dk, and through it dg and
dbeta; upstream's bisection tied it to a key block of 64). Its way out is another backend (tilelang, far
larger than a wheel one carries) or a newer Triton than torch ships. Measured on an H100 (Triton 3.6,
Qwen3.5's head dim of 128, bf16; bench/README.md), fla's own kernel agreed with this replacement and with a
float64 reference to bf16 rounding: the guard may be broader than the bug, but it is fla's, and it refuses
every gated call. The kernel is the only one the guard names, and fla routes it through its backend registry
(`fla.backends`): `register_backend` adds vlrl's `chunk_bwd_dqkwg` there, for the gated case on exactly the
GPUs and Tritons fla refuses (a usable tilelang, preferred by fla, stays first). Everything else (the forward,
the state passes, the WY representation) is fla's own Triton.

`chunk_bwd_dqkwg` below computes what fla's kernel computes, per chunk of `chunk_size` tokens of each sequence
(packed sequences by `cu_seqlens`, chunks restarting at every sequence) and each value head, with h the state
before the chunk ([K, V]), dh the gradient of the state after it, v the chunk's new values, g the gate's
chunk-local cumulative sum in log2 units (fla's `exp2` convention), and M the causal mask:
    dq = scale (exp2(g) * do h^T + (M * exp2(g_i - g_j) * do v^T) k)
    dk = exp2(g_last - g) * v dh^T + scale (M * exp2(g_i - g_j) * do v^T)^T q
    dw = -dv h^T
    dg = rowsum(dq * q) - rowsum(dk * k), and at the chunk's last token also
         exp2(g_last) sum(h * dh) + sum(exp2(g_last - g) * v dh^T * k)
in one of two ways (`VLRL_FLA_DQKWG`): `triton` (the default), vlrl's Triton kernel (`dqkwg_kernel.py`: per
chunk and head, every product a `tl.dot` of loaded tiles, none of an MMA result transposed), or `torch`,
batched matmuls over all chunks at once (the chunks are independent given h and dh), which also runs, with a
warning, where Triton cannot build the kernel (`dispatched`). Both multiply 16-bit inputs with float32
accumulation, as fla's kernel does. On an H100, forward + backward of the rule over 16,384
tokens (32 heads of 128, bf16): 5.08 ms with the Triton kernel, 16.67 ms with the batched matmuls, 5.34 ms
fla's own. `tests/test_fla_hopper.py` checks the PyTorch version against autograd of the chunk's own formula
in float64 and the Triton kernel (under Triton's interpreter) against the PyTorch version;
`bench/delta_rule_check.py` checks fla with each against the recurrent definition of the rule on the GPU.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings

import torch

BACKEND = "vlrl_dqkwg"


def chunk_bwd_dqkwg(q: torch.Tensor,  # [B, T, H, K]
                    k: torch.Tensor,  # [B, T, H, K]
                    v: torch.Tensor,  # [B, T, HV, V] (the delta rule's new values)
                    do: torch.Tensor,  # [B, T, HV, V]
                    h: torch.Tensor,  # [B, NT, HV, K, V] ([.., V, K] when state_v_first)
                    dh: torch.Tensor,  # as h
                    w: torch.Tensor | None = None,  # [B, T, HV, K]
                    g: torch.Tensor | None = None,  # [B, T, HV], chunk-local cumsum, log2 units
                    g_gamma: torch.Tensor | None = None,
                    dv: torch.Tensor | None = None,  # [B, T, HV, V]
                    scale: float | None = None,
                    state_v_first: bool = False,
                    cu_seqlens: torch.Tensor | None = None,  # [N + 1] (with B == 1)
                    chunk_size: int = 64,
                    chunk_indices: torch.Tensor | None = None,  # [NT, 2]: (sequence, chunk in it)
                    kernel: str = "torch",  # or "triton": dqkwg_kernel.py (CUDA, or Triton's interpreter)
                    ):
    """fla's `chunk_bwd_dqkwg` for the gated case (g given, g_gamma not): (dq, dk, dw, dg) as fla returns
    them (dq, dk in q's dtype and q's heads, dw like w or None, dg float32 (or g's wider) [B, T, HV])."""
    if g is None or g_gamma is not None:
        raise ValueError("vlrl's chunk_bwd_dqkwg covers the gated delta rule only (g given, no g_gamma)")
    B, T, H, K = k.shape
    HV = v.shape[2]
    scale = K ** -0.5 if scale is None else scale
    tok, valid, last = _chunks(B, T, chunk_size, cu_seqlens, chunk_indices, k.device)  # [C, BT], [C, BT], [C]
    C, n = tok.shape[0], B * T
    if kernel == "triton":
        from vlrl.adapters.dqkwg_kernel import dqkwg

        dq, dk, dw, dg = dqkwg(q, k, v, do, h, dh, w, g, dv, scale, state_v_first, tok[:, 0].contiguous(),
                               last + 1, chunk_size)
        if H != HV:
            dq, dk = dq.view(B, T, H, HV // H, K).sum(3), dk.view(B, T, H, HV // H, K).sum(3)
        return dq, dk, dw, dg

    def chunked(x):  # [B, T, heads, D] -> [C, HV, BT, D], zero past each sequence's end
        x = x.reshape(n, x.shape[2], -1)
        if x.shape[1] != HV:  # value head i reads query/key head i // (HV // H)
            x = x.repeat_interleave(HV // x.shape[1], dim=1)
        return (x[tok] * valid[..., None, None].to(x.dtype)).transpose(1, 2)

    qc, kc, vc, doc = chunked(q), chunked(k), chunked(v), chunked(do)
    hc, dhc = h.reshape(C, HV, *h.shape[-2:]), dh.reshape(C, HV, *dh.shape[-2:])
    if not state_v_first:  # the kernel's products read the state as [V, K]
        hc, dhc = hc.transpose(-1, -2), dhc.transpose(-1, -2)
    acc = torch.promote_types(q.dtype, torch.float32)
    gf = g.reshape(n, HV).to(acc)
    gc = (gf[tok] * valid[..., None]).transpose(1, 2)  # [C, HV, BT]
    g_last = gf[last]  # [C, HV]
    mm = functools.partial(_matmul, out=acc)

    dq = mm(doc, hc) * (torch.exp2(gc) * scale)[..., None]
    dk = mm(vc, dhc) * torch.where(valid[:, None], torch.exp2(g_last[..., None] - gc), 0)[..., None]
    dg_last = (hc.to(acc) * dhc.to(acc)).sum((-2, -1)) * torch.exp2(g_last) + (dk * kc).sum((-2, -1))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=k.device).tril()
    pair = causal & valid[:, None, :, None] & valid[:, None, None, :]
    ds = torch.where(pair, mm(doc, vc.transpose(-1, -2)) * torch.exp2(gc[..., :, None] - gc[..., None, :]), 0)
    ds = ds * scale  # [C, HV, BT(i), BT(j)]
    dq = dq + ds @ kc.to(acc)
    dk = dk + ds.transpose(-1, -2) @ qc.to(acc)
    dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # [C, HV, BT]
    at_last = (tok == last[:, None]) & valid  # each chunk's last token
    dg = dg + at_last[:, None] * dg_last[..., None]

    def unchunked(x, dtype):  # [C, HV, BT, D] -> [B, T, HV, D]; rows past a sequence's end dropped
        out = x.new_empty(n + 1, HV, x.shape[-1], dtype=dtype)
        out[torch.where(valid, tok, n)] = x.transpose(1, 2).to(dtype)  # (those rows all land on row n)
        return out[:n].view(B, T, HV, -1)

    dq, dk = unchunked(dq, q.dtype), unchunked(dk, k.dtype)
    if H != HV:
        dq, dk = dq.view(B, T, H, HV // H, K).sum(3), dk.view(B, T, H, HV // H, K).sum(3)
    dw = None
    if w is not None:
        dw = unchunked(-mm(chunked(dv), hc), w.dtype)
    return dq, dk, dw, unchunked(dg[..., None], torch.promote_types(g.dtype, torch.float32))[..., 0]


def _chunks(B, T, BT, cu_seqlens, chunk_indices, device):
    """Every chunk's token indices into the flattened [B * T] tokens ([C, BT], clamped into the chunk),
    which of them are in its sequence, and its last token's index ([C]). Chunks are ordered as fla's h is:
    by sequence, then position (`chunk_indices` when given, else from `cu_seqlens`, else B sequences of T)."""
    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=device) * T
    cu = cu_seqlens.long()
    if chunk_indices is None:
        counts = (cu[1:] - cu[:-1] + BT - 1) // BT
        seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        first = torch.cumsum(counts, 0) - counts
        within = torch.arange(len(seq), device=device) - first[seq]
    else:
        seq, within = chunk_indices[:, 0].long(), chunk_indices[:, 1].long()
    start, end = cu[seq] + within * BT, cu[seq + 1]
    last = torch.minimum(start + BT, end) - 1
    tok = start[:, None] + torch.arange(BT, device=device)
    valid = tok <= last[:, None]
    return torch.minimum(tok, last[:, None]), valid, last


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """a @ b over leading batch dims, in `out` (float32 accumulation of 16-bit inputs on CUDA)."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and _has_out_dtype():
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a, b = a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])
        flat = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=out)
        return flat.view(*batch, *flat.shape[-2:])
    if a.dtype != b.dtype:  # (e.g. a float32 state against 16-bit tokens)
        a, b = a.to(out), b.to(out)
    return (a @ b).to(out)


@functools.cache
def _has_out_dtype() -> bool:
    """Whether this torch's CUDA bmm takes `out_dtype` (bf16 in, float32 out)."""
    try:
        one = torch.ones(1, 1, 1, dtype=torch.bfloat16, device="cuda")
        return torch.bmm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


DEFAULT_KERNEL = "triton"


def kernel_choice() -> str:
    """`VLRL_FLA_DQKWG`: `torch` (the batched-matmul version) or `triton` (dqkwg_kernel.py); `0` turns the
    replacement off (fla's own kernel, or its refusal)."""
    chosen = os.environ.get("VLRL_FLA_DQKWG", DEFAULT_KERNEL)
    return chosen if chosen in ("torch", "triton") else DEFAULT_KERNEL


_TRITON_FAILED: list[str] = []  # why vlrl's Triton kernel could not run here (then the PyTorch version runs)


def dispatched(*args, **kwargs):
    """What fla's registry calls: `chunk_bwd_dqkwg` with `kernel_choice()`. Where Triton cannot build vlrl's
    kernel (an error raised by Triton itself: a compiler or resource error on a Triton this was not measured
    with), the PyTorch version runs instead, for the rest of the process, and a warning says why."""
    kernel = kernel_choice()
    if kernel == "triton" and not _TRITON_FAILED:
        try:
            return chunk_bwd_dqkwg(*args, **kwargs, kernel="triton")
        except Exception as e:
            if not type(e).__module__.startswith("triton"):
                raise
            _TRITON_FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            warnings.warn(f"vlrl's Triton kernel for fla's chunk_bwd_dqkwg failed to build here "
                          f"({_TRITON_FAILED[0]}); its PyTorch version runs instead (~3x slower; "
                          "VLRL_FLA_DQKWG=torch says so up front)", stacklevel=2)
    return chunk_bwd_dqkwg(*args, **kwargs, kernel="torch")


def fla_refuses_here() -> bool:
    """Whether fla's own gated `chunk_bwd_dqkwg` refuses this machine (a Hopper GPU, Triton 3.4 .. 3.7.0)."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def register_backend(force: bool = False) -> bool:
    """Register vlrl's `chunk_bwd_dqkwg` with fla's backend registry where fla refuses its own (or anywhere
    with `force`, for checks). Idempotent; returns whether it is registered (False without fla)."""
    try:
        from fla.backends import BaseBackend, register
    except ImportError:
        return False
    if not (force or fla_refuses_here()):
        return False

    class VlrlBackend(BaseBackend):
        backend_type = BACKEND
        env_var = "VLRL_FLA_DQKWG"  # 0: off (fla's own kernel, or its refusal); else `kernel_choice`
        priority = 6  # after fla's tilelang backend (5), where that one is usable

        def chunk_bwd_dqkwg_verifier(self, *args, **kwargs):
            call = inspect.signature(chunk_bwd_dqkwg).bind(*args, **kwargs).arguments
            return call.get("g") is not None and call.get("g_gamma") is None, "vlrl's: the gated case only"

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return dispatched(*args, **kwargs)

    register("common")(VlrlBackend)
    return True
