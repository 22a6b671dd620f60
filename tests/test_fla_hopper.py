"""vlrl's `chunk_bwd_dqkwg` (the fla backward kernel it replaces on Hopper with Triton < 3.7.1) against
autograd of the chunk's own formula, in float64 on the CPU: packed sequences with partial chunks, value heads
sharing query/key heads, both state layouts, fla's chunk indices given or derived."""

import math

import pytest
import torch

from vlrl.adapters.fla_hopper import chunk_bwd_dqkwg, kernel_choice, register_backend


def chunk_terms(q, k, w, g, v, h, do, dh, dv, lengths, BT, scale):
    """sum(do * o) + sum(dh * h_next) + sum(dv * (-w h)) over every chunk of every sequence ([T, ...] tokens,
    g the gate's chunk-local cumsum in natural units, h/dh [chunks, HV, K, V]): the scalar whose gradients
    in q, k, w and g the kernel returns (v, h and the incoming gradients held fixed)."""
    HV = v.shape[1]
    q, k = (x.repeat_interleave(HV // x.shape[1], dim=1) for x in (q, k))
    total, c, start = 0, 0, 0
    for length in lengths:
        for a in range(start, start + length, BT):
            b = min(a + BT, start + length)
            Q, K, V, G = q[a:b], k[a:b], v[a:b], g[a:b]  # [L, HV, ...], G [L, HV]
            decay = torch.exp(G[:, None] - G[None, :]).permute(2, 0, 1)  # [HV, L(i), L(j)]
            scores = torch.einsum("ihk,jhk->hij", Q, K) * decay * torch.ones_like(decay).tril()
            o = scale * (torch.exp(G)[..., None] * torch.einsum("lhk,hkv->lhv", Q, h[c])
                         + torch.einsum("hij,jhv->ihv", scores, V))
            last = G[-1]
            h_next = (torch.exp(last)[:, None, None] * h[c]
                      + torch.einsum("lhk,lhv->hkv", K * torch.exp(last - G)[..., None], V))
            new_v = -torch.einsum("lhk,hkv->lhv", w[a:b], h[c])
            total = total + (do[a:b] * o).sum() + (dh[c] * h_next).sum() + (dv[a:b] * new_v).sum()
            c += 1
        start += length
    return total


def case(lengths, H, HV, K, V, BT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, chunks = sum(lengths), sum(math.ceil(n / BT) for n in lengths)
    f64 = dict(dtype=torch.float64, generator=gen)
    q, k = torch.randn(T, H, K, **f64), torch.randn(T, H, K, **f64)
    w = torch.randn(T, HV, K, **f64)
    g = -torch.rand(T, HV, **f64) * 0.5  # (any values: the gradients are in g itself)
    v, do, dv = torch.randn(T, HV, V, **f64), torch.randn(T, HV, V, **f64), torch.randn(T, HV, V, **f64)
    h, dh = torch.randn(chunks, HV, K, V, **f64), torch.randn(chunks, HV, K, V, **f64)
    return q, k, w, g, v, h, do, dh, dv


def expected(lengths, BT, scale, q, k, w, g, *fixed):
    leaves = [x.clone().requires_grad_(True) for x in (q, k, w, g)]
    chunk_terms(*leaves, *fixed, lengths, BT, scale).backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (2, 4)])
def test_packed_chunks_match_autograd_of_the_chunk_formula(state_v_first, heads):
    lengths, BT, (H, HV), K, V, scale = [13, 8, 3, 20], 8, heads, 5, 6, 0.37
    q, k, w, g, v, h, do, dh, dv = case(lengths, H, HV, K, V, BT)
    want = expected(lengths, BT, scale, q, k, w, g, v, h, do, dh, dv)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    state = (lambda x: x.transpose(-1, -2).contiguous()) if state_v_first else (lambda x: x)
    got = chunk_bwd_dqkwg(q[None], k[None], v[None], do[None], state(h)[None], state(dh)[None], w=w[None],
                          g=g[None] / math.log(2), dv=dv[None], scale=scale, state_v_first=state_v_first,
                          cu_seqlens=cu, chunk_size=BT)
    for name, a, b in zip(["dq", "dk", "dw", "dg"], got, want):
        assert a.shape[1:] == b.shape, name
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10, msg=name)


def test_equal_length_batch_and_given_chunk_indices():
    """B sequences of T (no cu_seqlens) == the same sequences packed, with fla's chunk indices handed in."""
    lengths, BT, K, V = [11, 11], 4, 3, 4
    q, k, w, g, v, h, do, dh, dv = case(lengths, 2, 2, K, V, BT, seed=1)
    want = expected(lengths, BT, 0.5, q, k, w, g, v, h, do, dh, dv)

    def batched(x):  # [2 * 11, ...] -> [2, 11, ...]
        return x.view(2, 11, *x.shape[1:])

    got = chunk_bwd_dqkwg(batched(q), batched(k), batched(v), batched(do), h.view(2, 3, *h.shape[1:]),
                          dh.view(2, 3, *dh.shape[1:]), w=batched(w), g=batched(g) / math.log(2),
                          dv=batched(dv), scale=0.5, chunk_size=BT)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.flatten(0, 1), b, rtol=1e-10, atol=1e-10)
    indices = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    packed = chunk_bwd_dqkwg(q[None], k[None], v[None], do[None], h[None], dh[None], w=w[None],
                             g=g[None] / math.log(2), dv=dv[None], scale=0.5, chunk_size=BT,
                             cu_seqlens=torch.tensor([0, 11, 22]), chunk_indices=indices)
    for a, b in zip(packed, want):
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10)


def test_a_leak_between_sequences_is_caught():
    """The oracle tells sequences apart: the same tokens as one sequence give other gradients."""
    lengths, BT = [5, 6], 4
    q, k, w, g, v, h, do, dh, dv = case(lengths, 1, 1, 3, 3, BT, seed=2)
    got = chunk_bwd_dqkwg(q[None], k[None], v[None], do[None], h[None], dh[None], w=w[None],
                          g=g[None] / math.log(2), dv=dv[None], scale=1.0, chunk_size=BT,
                          cu_seqlens=torch.tensor([0, 5, 11]))
    merged = expected([11], BT, 1.0, q, k, w, g, v, h[:3], do, dh[:3], dv)
    assert not torch.allclose(got[0][0], merged[0])


def test_ungated_calls_are_refused():
    q, k, w, g, v, h, do, dh, dv = case([4], 1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="gated"):
        chunk_bwd_dqkwg(q[None], k[None], v[None], do[None], h[None], dh[None], w=w[None], dv=dv[None])


def positional_call() -> tuple:
    """fla's `chunk_bwd_dqkwg` arguments by position, for packed sequences of 13, 8, 3 and 20 tokens."""
    lengths, BT = [13, 8, 3, 20], 8
    q, k, w, g, v, h, do, dh, dv = case(lengths, 2, 4, 5, 6, BT)
    cu = torch.tensor([0, 13, 21, 24, 44], dtype=torch.int32)
    return (q[None], k[None], v[None], do[None], h[None], dh[None], w[None], g[None], None, dv[None], 0.3,
            False, cu, BT)


def test_fla_dispatches_its_kernel_to_vlrl_once_registered(monkeypatch):
    """With flash-linear-attention importable (the `qwen3_5` extra; not in the test environment, whose CPU
    runs would bind its Triton kernels through transformers): fla's own entry point returns vlrl's result, by
    keyword and by position, and `VLRL_FLA_DQKWG=0` hands the call back to fla. Without fla: nothing is
    registered."""
    try:
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg as fla_entry
    except ImportError:
        assert register_backend(force=True) is False
        return
    assert register_backend(force=True)
    monkeypatch.setenv("VLRL_FLA_DQKWG", "torch")  # (the default, Triton, needs a GPU or the interpreter)
    args = positional_call()
    want = chunk_bwd_dqkwg(*args)
    names = ("q", "k", "v", "do", "h", "dh", "w", "g", "g_gamma", "dv", "scale", "state_v_first",
             "cu_seqlens", "chunk_size")
    for got in (fla_entry(*args), fla_entry(**dict(zip(names, args)))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    monkeypatch.setenv("VLRL_FLA_DQKWG", "0")
    try:
        got = fla_entry(*args)
    except Exception:  # fla's own Triton kernel (on a CPU: no driver)
        return
    assert not all(torch.equal(a, b) for a, b in zip(got, want))


def test_kernel_choice_reads_its_variable(monkeypatch):
    """`VLRL_FLA_DQKWG`: the Triton kernel unless `torch` is asked for; anything else is the default."""
    monkeypatch.delenv("VLRL_FLA_DQKWG", raising=False)
    assert kernel_choice() == "triton"
    for value, chosen in (("torch", "torch"), ("triton", "triton"), ("bogus", "triton")):
        monkeypatch.setenv("VLRL_FLA_DQKWG", value)
        assert kernel_choice() == chosen


def test_a_triton_kernel_that_cannot_build_falls_back_to_pytorch(monkeypatch):
    """Where Triton raises building vlrl's kernel, fla's registry still gets the right result (the PyTorch
    version), with one warning, and the Triton kernel is not tried again; an error of another kind is
    raised."""
    import vlrl.adapters.dqkwg_kernel as dqkwg_kernel
    import vlrl.adapters.fla_hopper as fla_hopper

    CompilationError = type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})
    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise CompilationError("at 12:8: unsupported layout")

    monkeypatch.setattr(dqkwg_kernel, "dqkwg", broken)
    monkeypatch.setattr(fla_hopper, "_TRITON_FAILED", [])
    monkeypatch.setenv("VLRL_FLA_DQKWG", "triton")
    args = positional_call()
    want = chunk_bwd_dqkwg(*args)
    with pytest.warns(UserWarning, match="CompilationError: at 12:8"):
        got = fla_hopper.dispatched(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    got = fla_hopper.dispatched(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(tries) == 1

    def wrong(*args, **kwargs):
        raise IndexError("a bug of vlrl's, not Triton's")

    monkeypatch.setattr(dqkwg_kernel, "dqkwg", wrong)
    monkeypatch.setattr(fla_hopper, "_TRITON_FAILED", [])
    with pytest.raises(IndexError):
        fla_hopper.dispatched(*args)


KERNEL_CHECK = """
import math, sys
import torch
sys.path.insert(0, {tests!r})
from test_fla_hopper import case
from vlrl.adapters.fla_hopper import chunk_bwd_dqkwg
cases = [([13, 8, 3, 20], 16, 2, 4, 16, 32, False), ([40, 9], 16, 2, 2, 32, 16, True)]
for lengths, BT, H, HV, K, V, svf in cases:
    q, k, w, g, v, h, do, dh, dv = (x.float() for x in case(lengths, H, HV, K, V, BT))
    if svf:
        h, dh = h.transpose(-1, -2).contiguous(), dh.transpose(-1, -2).contiguous()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    args = [x[None] for x in (q, k, v, do, h, dh)]
    kw = dict(w=w[None], g=g[None] / math.log(2), dv=dv[None], scale=0.3, cu_seqlens=cu, chunk_size=BT,
              state_v_first=svf)
    want, got = chunk_bwd_dqkwg(*args, **kw), chunk_bwd_dqkwg(*args, **kw, kernel="triton")
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
        err = float((a - b).norm() / b.norm())
        assert err < 1e-5, err
print("ok")
"""


@pytest.mark.slow
def test_the_triton_kernel_equals_the_pytorch_version_in_triton_s_interpreter(tmp_path):
    """dqkwg_kernel.py run by Triton's interpreter on the CPU (float32; the GPU: bench/delta_rule_check.py):
    packed sequences with partial chunks, value heads sharing key heads, both state layouts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "check.py"
    script.write_text(KERNEL_CHECK.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
