"""vlrl's update path (chunked logprobs with their own backward, compiled layers, selective checkpointing)
computes the same logprobs and gradients as the naive full-logits path, on the tiny model."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from update_step import bench_adapter, make_rollouts, naive_logprobs, naive_update  # noqa: E402

from vlrl.adapters.qwen3_vl import compile_decoder_layers, set_checkpointing  # noqa: E402
from vlrl.update import LossSettings, accumulate_gradients  # noqa: E402


@pytest.fixture(scope="module")
def case(tiny_model):
    cfg = tiny_model.config
    adapter = bench_adapter(cfg.image_token_id, cfg.video_token_id, 0, 1, max_model_len=4096)
    batch = adapter.build_batch(make_rollouts(adapter, 3, 120, 1, 64, 60, cfg.text_config.vocab_size))
    with torch.no_grad():  # behavior logprobs near the model's own, as a sampler's are
        own = naive_logprobs(tiny_model.eval(), batch, adapter.banned_token_ids)
    batch.behavior_logprobs = (own + 0.05 * torch.randn(own.shape, generator=torch.Generator().manual_seed(0))) * batch.loss_mask
    return adapter, batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("variant", ["plain", "checkpoint-half"])
def test_fast_path_matches_naive(tiny_model, case, dtype, tol, variant):
    adapter, batch = case
    model = copy.deepcopy(tiny_model).to(dtype).train()
    model.model.visual.requires_grad_(False)
    if variant == "checkpoint-half":
        set_checkpointing(model, 0.5)
        assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [False, True]
    settings = LossSettings(max_new_tokens=60)
    batch = batch.to("cpu")
    model.zero_grad(set_to_none=True)
    ref_lp = naive_update(model, batch, settings, adapter.banned_token_ids)
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    policy = adapter.policy(model, 1.0)
    with torch.no_grad():
        lp, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    accumulate_gradients(policy, batch, [[0, 1], [2]], settings)
    fast = grads(model)
    m = batch.loss_mask.bool()
    assert float((lp - ref_lp)[m].abs().max()) < (1e-5 if dtype == torch.float32 else 5e-2)
    assert set(fast) == set(ref) and len(ref) > 10
    for name, g in ref.items():
        err = float((fast[name].float() - g.float()).norm() / g.float().norm().clamp(min=1e-12))
        assert err < tol, (name, err)


def test_compiled_layers_give_the_same_logprobs(tiny_model, case):
    adapter, batch = case
    model = copy.deepcopy(tiny_model).eval()
    policy = adapter.policy(model, 1.0)
    with torch.no_grad():
        before, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
        compile_decoder_layers(model)
        after, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
