"""vlrl's Triton kernel for fla's gated `chunk_bwd_dqkwg` (what `fla_hopper.chunk_bwd_dqkwg` computes in
PyTorch, in one pass): written so that no matmul result is transposed in registers, the construct Triton
3.4 .. 3.7.0 miscompiles on Hopper (fla#640). Where fla's kernel forms ds = do v^T and then multiplies by its
transpose, this one forms ds and ds^T each as its own product of loaded tiles (do v^T and v do^T, the
transposes made by the loads' addressing), one extra BT x BT x BV product per value block.

One program per (key block, chunk, value head); chunks are given by their first token and end in the
flattened [B * T] tokens, so equal-length batches and packed sequences are the same to it. fp32 accumulation.
`tests/test_fla_hopper.py` checks it against the PyTorch version in Triton's interpreter (on the CPU);
`bench/delta_rule_check.py` checks it on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dqkwg(q, k, v, g, h, do, dh, dq, dk, dw, dv, dg, starts, ends, scale, n_tokens,
           H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
           BK: tl.constexpr, BV: tl.constexpr, STATE_V_FIRST: tl.constexpr, USE_DW: tl.constexpr):
    i_k, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    start = tl.load(starts + i_c).to(tl.int64)
    end = tl.load(ends + i_c).to(tl.int64)
    rows = tl.arange(0, BT)
    o_t = start + rows
    m_t = o_t < end
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    state = (i_c.to(tl.int64) * HV + i_hv) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # [i, j] = do_i . v_j
    b_dst = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i], formed by its own product
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vt = m_v[:, None] & m_t[None, :]
        tv = o_t[:, None] * (HV * V) + i_hv * V + o_v[None, :]  # [BT, BV]
        vt = o_t[None, :] * (HV * V) + i_hv * V + o_v[:, None]  # [BV, BT]
        b_v = tl.load(v + tv, mask=m_tv, other=0.0)
        b_vt = tl.load(v + vt, mask=m_vt, other=0.0)
        b_do = tl.load(do + tv, mask=m_tv, other=0.0)
        b_dot = tl.load(do + vt, mask=m_vt, other=0.0)
        if STATE_V_FIRST:  # the state's [V, K] or [K, V] tile, read as [BV, BK]
            vk = o_v[:, None] * K + o_k[None, :]
        else:
            vk = o_v[:, None] + o_k[None, :] * V
        m_vk = m_v[:, None] & m_k[None, :]
        b_h = tl.load(h + state + vk, mask=m_vk, other=0.0)
        b_dh = tl.load(dh + state + vk, mask=m_vk, other=0.0)
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
        b_ds = tl.dot(b_do, b_vt, b_ds)
        b_dst = tl.dot(b_v, b_dot, b_dst)
        b_dq = tl.dot(b_do, b_h.to(b_do.dtype), b_dq)
        b_dk = tl.dot(b_v, b_dh.to(b_v.dtype), b_dk)
        if USE_DW:
            b_dv = tl.load(dv + tv, mask=m_tv, other=0.0)
            b_dw = tl.dot(b_dv.to(b_v.dtype), b_h.to(b_v.dtype), b_dw)

    tk = o_t[:, None] * (HV * K) + i_hv * K + o_k[None, :]  # [BT, BK] into [tokens, HV, K]
    m_tk = m_t[:, None] & m_k[None, :]
    if USE_DW:
        tl.store(dw + tk, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    qk = o_t[:, None] * (H * K) + i_h * K + o_k[None, :]
    b_q = tl.load(q + qk, mask=m_tk, other=0.0)
    b_k = tl.load(k + qk, mask=m_tk, other=0.0)
    b_g = tl.load(g + o_t * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
    last = tl.minimum(start + BT, end) - 1
    g_last = tl.load(g + last * HV + i_hv).to(tl.float32)

    b_dq = b_dq * (tl.exp2(b_g) * scale)[:, None]
    b_dk = b_dk * tl.where(m_t, tl.exp2(g_last - b_g), 0.0)[:, None]
    dk_k = tl.sum(tl.sum(b_dk * b_k.to(tl.float32), axis=1), axis=0)
    dg_last = tl.sum(b_hdh, axis=0) * tl.exp2(g_last) + dk_k
    pair = (rows[:, None] >= rows[None, :]) & m_t[:, None] & m_t[None, :]  # [i, j]: j <= i
    b_ds = tl.where(pair, b_ds * tl.exp2(b_g[:, None] - b_g[None, :]), 0.0) * scale
    pair_t = (rows[None, :] >= rows[:, None]) & m_t[:, None] & m_t[None, :]  # [j, i]
    b_dst = tl.where(pair_t, b_dst * tl.exp2(b_g[None, :] - b_g[:, None]), 0.0) * scale
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq)
    b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk)
    b_dg = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
    b_dg = tl.where(o_t == last, b_dg + dg_last, b_dg)
    tl.store(dq + tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    # dg: one row of partial sums per key block, summed after
    tl.store(dg + i_k.to(tl.int64) * n_tokens * HV + o_t * HV + i_hv, b_dg, mask=m_t)


def dqkwg(q, k, v, do, h, dh, w, g, dv, scale, state_v_first, starts, ends, chunk_size):
    """The kernel over every chunk ([C] first tokens and ends in the flattened tokens; h/dh [.., C, HV, ..]):
    (dq, dk, dw, dg) as `fla_hopper.chunk_bwd_dqkwg` returns them."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    C, n = starts.numel(), B * T
    BK = min(64, triton.next_power_of_2(K))
    BV = min(64, triton.next_power_of_2(V))
    NK = triton.cdiv(K, BK)
    q, k, v, do, h, dh = (x.contiguous() for x in (q, k, v, do, h, dh))
    dq = torch.empty(B, T, HV, K, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, T, HV, K, dtype=k.dtype, device=k.device)
    dw = None if w is None else torch.empty(B, T, HV, K, dtype=w.dtype, device=w.device)
    dg = torch.zeros(NK, n, HV, dtype=torch.promote_types(g.dtype, torch.float32), device=g.device)
    _dqkwg[(NK, C, HV)](q, k, v, g.contiguous(), h, do, dh, dq, dk, dw if dw is not None else dq,
                        dv.contiguous() if dv is not None else do, dg, starts, ends, scale, n,
                        H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=BK, BV=BV, STATE_V_FIRST=state_v_first,
                        USE_DW=w is not None, num_warps=4, num_stages=2)
    return dq, dk, dw, dg.sum(0).view(B, T, HV)
