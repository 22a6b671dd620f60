"""The chunked logprob computation against the naive full-vocabulary one, values and gradients."""

import pytest
import torch

from vlrl.algo.logprobs import sequence_logprobs, token_logprobs


def naive(hidden, weight, ids, mask, temperature, banned):
    logits = (hidden @ weight.T).float() / temperature  # [B, L, V]
    if banned is not None:
        logits[..., banned] = float("-inf")
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
    out = torch.zeros(ids.shape)
    out[:, 1:] = lp
    return out * mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_matches_naive_values_and_gradients(temperature, chunk):
    torch.manual_seed(0)
    B, L, H, V = 3, 9, 16, 50
    hidden = torch.randn(B, L, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(2, V, (B, L))
    mask = torch.zeros(B, L)
    mask[0, 4:9] = 1
    mask[1, 2:5] = 1
    mask[2, 7:] = 1
    banned = torch.tensor([0, 1])
    ours, _ = sequence_logprobs(hidden, weight, ids, mask, temperature, banned, chunk_size=chunk)
    ref = naive(hidden, weight, ids, mask, temperature, banned)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad((ours * 1.3).sum(), (hidden, weight))
    g_ref = torch.autograd.grad((ref * 1.3).sum(), (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (ours[mask == 0] == 0).all()


def test_entropy_matches_definition_with_banned_tokens():
    torch.manual_seed(1)
    h, w = torch.randn(6, 8), torch.randn(20, 8)
    t = torch.randint(3, 20, (6,))
    lp, ent = token_logprobs(h, w, t, 1.0, torch.tensor([0, 1, 2]), chunk_size=4)
    logits = h @ w.T
    logits[:, :3] = float("-inf")
    p = torch.softmax(logits, -1)
    ref = -(p[:, 3:] * torch.log(p[:, 3:])).sum(-1)
    torch.testing.assert_close(ent, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, torch.log(p.gather(-1, t[:, None]).squeeze(-1)))


def test_first_position_cannot_be_scored():
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long),
                          torch.ones(1, 3))


def test_entropy_gradient_matches_autograd_of_the_definition():
    """The fused backward's entropy term (an entropy bonus) against autograd through softmax."""
    torch.manual_seed(2)
    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(2, 30, (7,))
    banned = torch.tensor([0, 1])
    lp, ent = token_logprobs(h, w, t, 0.8, banned, chunk_size=3)
    (0.3 * lp.sum() + 1.7 * ent.sum()).backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = (h @ w.T) / 0.8
    logits = logits.index_fill(-1, banned, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    ref_ent = -(p[:, 2:] * logp[:, 2:]).sum(-1)
    (0.3 * logp.gather(-1, t[:, None]).sum() + 1.7 * ref_ent.sum()).backward()
    torch.testing.assert_close(g_h, h.grad)
    torch.testing.assert_close(g_w, w.grad)


def test_the_backward_reads_nothing_on_the_host_with_or_without_an_entropy_term():
    """Each chunk's backward learns from autograd whether the entropy has a gradient (no look at its values:
    on a GPU a read per chunk made the host wait); the entropy-free gradient is the logprob term alone."""
    from host_reads import HostReads

    torch.manual_seed(3)
    h = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64)
    t = torch.randint(0, 30, (7,))
    grads = []
    for coef in (0.0, 1.7):
        lp, ent = token_logprobs(h, w, t, 0.8, chunk_size=3)
        loss = lp.sum() + coef * ent.sum() if coef else lp.sum()
        with HostReads() as reads:
            loss.backward()
        assert reads.reads == 0
        grads.append(h.grad.clone())
        h.grad = None
    ref = torch.log_softmax((h @ w.T) / 0.8, -1).gather(-1, t[:, None]).sum()
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(grads[0], g_ref)
    assert not torch.allclose(grads[1], g_ref)  # the entropy term is there when it is used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_eager(dtype):
    """train.compile's fused (compiled) softmax statistics and backward against the eager ones: values,
    entropy, and gradients with a logprob and an entropy term, banned tokens, temperature, a ragged last
    chunk."""
    torch.manual_seed(3)
    h = torch.randn(11, 16, dtype=dtype)
    w = torch.randn(40, 16, dtype=dtype)
    t = torch.randint(3, 40, (11,))
    banned = torch.tensor([0, 1, 2])
    out = {}
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        lp, ent = token_logprobs(hh, ww, t, 0.7, banned, chunk_size=4, fused=fused)
        (0.5 * lp.sum() + 0.25 * ent.sum()).backward()
        out[fused] = (lp.detach(), ent.detach(), hh.grad, ww.grad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(out[False], out[True]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, **tol)
