"""Selective activation checkpointing (`adapters/checkpointing.py`) on the tiny model: a packed ragged step's
loss and gradients are bit-for-bit those of no checkpointing, and the backward recomputes elementwise ops but
no matrix product (full checkpointing recomputes those too)."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ragged  # noqa: E402

from vlrl.adapters.checkpointing import layer_modes, spread  # noqa: E402
from vlrl.adapters.qwen3_vl import set_checkpointing  # noqa: E402
from vlrl.config import AlgorithmConfig  # noqa: E402
from vlrl.planner import StepPlan, pack_micro_batches  # noqa: E402
from vlrl.update import accumulate_gradients  # noqa: E402

MATMULS = {"mm", "bmm", "addmm"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def packed_step(tiny_model, adapter):
    import copy

    from update_step import bench_adapter

    model = copy.deepcopy(tiny_model).train()
    model.model.visual.requires_grad_(False)
    cfg = model.config
    bench = bench_adapter(cfg.image_token_id, cfg.video_token_id, 0, 1, max_model_len=1 << 20)
    spec = ragged.RaggedSpec.tiny()
    rollouts = ragged.ragged_rollouts(bench, spec, cfg.text_config.vocab_size, cfg.image_token_id - 2,
                                      cfg.image_token_id - 1)
    batch = bench.build_batch(rollouts)
    packs = pack_micro_batches(batch.lengths, spec.micro_batch_tokens, batch.patches_per_sample)
    plan = StepPlan(packs, packed=True)
    assert len(plan.micro_batches) > 1
    policy = bench.policy(model, 1.0)
    ragged.own_logprobs(policy, batch, plan, "cpu")
    return model, policy, batch, plan


def run(packed_step, full: float, selective: float):
    model, policy, batch, plan = packed_step
    set_checkpointing(model, full, selective)
    model.zero_grad(set_to_none=True)
    with CountOps() as counted:
        sums = accumulate_gradients(policy, batch, plan, AlgorithmConfig(), ragged.MAX_NEW_TOKENS)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums["loss"], grads, counted.ops


def test_selective_checkpointing_is_exact_and_recomputes_no_matmul(packed_step):
    model = packed_step[0]
    loss, grads, ops = run(packed_step, 0.0, 0.0)
    sel_loss, sel_grads, sel_ops = run(packed_step, 0.0, 1.0)
    assert layer_modes(model.model.language_model.layers) == ["selective", "selective"]
    mix_loss, mix_grads, _ = run(packed_step, 0.5, 0.5)
    assert layer_modes(model.model.language_model.layers) == ["full", "selective"]
    full_loss, _, full_ops = run(packed_step, 1.0, 0.0)
    assert sel_loss == loss == mix_loss and len(grads) > 10
    for name, g in grads.items():
        assert torch.equal(sel_grads[name], g), name
        assert torch.equal(mix_grads[name], g), name
    matmuls = lambda c: sum(c[k] for k in MATMULS)  # noqa: E731
    assert matmuls(sel_ops) == matmuls(ops) < matmuls(full_ops)  # matrix products kept, not recomputed
    assert sum(sel_ops.values()) - matmuls(sel_ops) > sum(ops.values()) - matmuls(ops)  # the rest recomputed
    # the norms and activation recomputed
    assert sel_ops["rsqrt"] > ops["rsqrt"] and sel_ops["silu"] > ops["silu"]
    assert full_loss == loss


def test_layers_are_stacked_full_at_the_bottom_keep_at_the_top(monkeypatch):
    """The backward frees the top layers first: those keeping the most go there
    (adapters/checkpointing.py)."""
    import vlrl.adapters.checkpointing as ckpt

    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(8)])
    for layer in layers:
        layer.gradient_checkpointing = False
    ckpt.set_layer_checkpointing(layers, 2, 3)
    assert layer_modes(layers) == ["full"] * 2 + ["selective"] * 3 + ["none"] * 3
    ckpt.set_layer_checkpointing(layers, 0, 8)
    assert layer_modes(layers) == ["selective"] * 8
    monkeypatch.setattr(ckpt, "PLACEMENT", "spread")
    ckpt.set_layer_checkpointing(layers, 2, 3)
    assert layer_modes(layers) == ["none", "selective", "none", "full",
                                   "selective", "none", "selective", "full"]


def test_spread_takes_positions_evenly():
    assert spread(8, 2) == [3, 7] and spread(8, 0) == [] and spread(8, 8) == list(range(8))
    assert spread(6, 2, [0, 2, 4]) == [2, 4]  # among the layers left: 2 of 3


def test_kept_logits_give_the_same_logprobs_and_gradients():
    """The logprob head with `keep_logits` (no recompute in its backward) against the recompute: equal
    bits."""
    from vlrl.algo.logprobs import token_logprobs

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    out = []
    for keep in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = token_logprobs(h, w, targets, 0.7, torch.tensor([3, 4]), chunk_size=16, keep_logits=keep)
        (lp * torch.linspace(-1, 1, 37) + 0.1 * ent).sum().backward()
        out.append((lp, ent, h.grad, w.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert out[0][2].abs().sum() > 0 and out[0][3].abs().sum() > 0


def test_a_selective_layer_keeps_a_mixture_of_experts_grouped_gemms():
    """The experts' grouped GEMMs (transformers' `grouped_mm` experts) are matrix products too: a selective
    layer keeps their outputs, as it keeps the dense layers' (it recomputed them before)."""
    from torch.utils.checkpoint import checkpoint

    from vlrl.adapters import checkpointing

    checkpointing.SAVED = checkpointing.SAVED or checkpointing._saved_ops()
    torch.manual_seed(0)
    w = torch.randn(2, 32, 16, dtype=torch.bfloat16, requires_grad=True)  # 2 experts
    offs = torch.tensor([24, 48], dtype=torch.int32)  # rows 0..23 to the first, 24..47 to the second

    def experts(x):
        return torch.nn.functional.silu(torch._grouped_mm(x.sin(), w, offs=offs))

    counts, grads = {}, {}
    for mode in ("none", "selective", "full"):
        x = torch.randn(48, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        w.grad = None
        with CountOps() as counted:
            if mode == "none":
                y = experts(x)
            else:
                kw = {"context_fn": checkpointing._selective_contexts} if mode == "selective" else {}
                y = checkpoint(experts, x, use_reentrant=False, **kw)
            y.float().sum().backward()
        counts[mode], grads[mode] = counted.ops, (x.grad, w.grad)
    assert counts["selective"]["_grouped_mm"] == counts["none"]["_grouped_mm"] < counts["full"]["_grouped_mm"]
    assert counts["selective"]["sin"] == 2 * counts["none"]["sin"]  # the elementwise op is recomputed
    for mode in ("selective", "full"):
        assert all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"]))
