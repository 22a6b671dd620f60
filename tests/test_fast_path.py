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


def test_repeated_images_are_encoded_once_with_the_same_results(tiny_model):
    """A GRPO-like batch (a prompt's image repeated over its group, plus an image one pixel away from another):
    with image sharing on, the vision tower sees each distinct image once, and the logprobs and every gradient
    (vision tower trainable) equal those of encoding every copy."""
    from vlrl.adapters.shared_images import set_image_sharing
    from vlrl.records import EncodedPrompt, Rollout

    cfg = tiny_model.config
    adapter = bench_adapter(cfg.image_token_id, cfg.video_token_id, 0, 1, max_model_len=4096)
    base = make_rollouts(adapter, 2, 120, 1, 64, 60, cfg.text_config.vocab_size)
    near = base[1].prompt.pixel_values.clone()
    near[5, 7] += 0.25  # same grid, one value different: must not be shared
    twin = EncodedPrompt(input_ids=base[1].prompt.input_ids, messages=[], images=[], pixel_values=near,
                         image_grid_thw=base[1].prompt.image_grid_thw)
    g = torch.Generator().manual_seed(4)
    rollouts = []
    for prompt in (base[0].prompt, base[0].prompt, base[1].prompt, base[0].prompt, twin):
        comp = torch.randint(2, 300, (60,), generator=g).tolist()
        rollouts.append(Rollout(prompt=prompt, completion_ids=comp, logprobs=[-1.0] * 60, finish_reason="length",
                                advantage=float(torch.randn(1, generator=g))))
    batch = adapter.build_batch(rollouts)
    model = copy.deepcopy(tiny_model).train()  # every parameter trainable, the vision tower included
    rows_seen = []
    model.model.visual.patch_embed.register_forward_hook(lambda m, a, out: rows_seen.append(a[0].shape[0]))
    policy = adapter.policy(model, 1.0)
    out = {}
    for shared in (False, True):
        set_image_sharing(model.model.visual, shared)
        rows_seen.clear()
        model.zero_grad(set_to_none=True)
        lp, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
        (lp * batch.loss_mask).sum().backward()
        out[shared] = (lp.detach(), grads(model), list(rows_seen))
    per_image = int(base[0].prompt.image_grid_thw.prod())
    assert out[False][2] == [5 * per_image]
    assert out[True][2] == [3 * per_image]  # base[0], base[1] and the near-twin
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    assert any("visual" in n for n in out[False][1])
    for name, ref in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], ref, atol=1e-5, rtol=1e-4, msg=name)


def test_vision_seqlens_on_the_host_change_nothing(tiny_model_dir, adapter):
    """With transformers >= 5.19 the vision blocks get their per-image boundaries from a CPU tensor (no host
    sync per block); the vision features are those of transformers' own path, to the bit."""
    from transformers import AutoModelForImageTextToText

    from vlrl.adapters.vision_seqlens import supported

    if not supported():
        pytest.skip("this transformers has no precomputed cu_seqlens (vlrl leaves the vision tower as it is)")
    hooked = adapter.load_model(torch.float32)
    plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    seen = []
    hooked.model.visual.blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["cu_seqlens"].device.type), with_kwargs=True)
    cfg = hooked.config
    bad = bench_adapter(cfg.image_token_id, cfg.video_token_id, 0, 1, max_model_len=4096)
    batch = bad.build_batch(make_rollouts(bad, 3, 120, 1, 64, 60, cfg.text_config.vocab_size))
    pv, grid = batch.model_inputs["pixel_values"], batch.model_inputs["image_grid_thw"]
    with torch.no_grad():
        ours = hooked.model.visual(pv, grid_thw=grid, return_dict=True)
        ref = plain.model.visual(pv, grid_thw=grid, return_dict=True)
    assert seen == ["cpu"]
    assert torch.equal(ours.pooler_output, ref.pooler_output)
    for a, b in zip(ours.deepstack_features, ref.deepstack_features):
        assert torch.equal(a, b)
