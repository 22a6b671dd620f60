"""vlrl's update path (chunked logprobs with their own backward, compiled layers, selective checkpointing)
computes the same logprobs and gradients as the naive full-logits path, on the tiny model."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from update_step import bench_adapter, make_rollouts, naive_logprobs, naive_update  # noqa: E402

from vlrl.adapters.qwen3_vl import compile_layers, set_checkpointing  # noqa: E402
from vlrl.config import AlgorithmConfig  # noqa: E402
from vlrl.update import accumulate_gradients  # noqa: E402


@pytest.fixture(scope="module")
def case(tiny_model):
    cfg = tiny_model.config
    adapter = bench_adapter(cfg.image_token_id, cfg.video_token_id, 0, 1, max_model_len=4096)
    batch = adapter.build_batch(make_rollouts(adapter, 3, 120, 1, 64, 60, cfg.text_config.vocab_size))
    with torch.no_grad():  # behavior logprobs near the model's own, as a sampler's are
        own = naive_logprobs(tiny_model.eval(), batch, adapter.banned_token_ids)
    batch.behavior_logprobs = (own + 0.05
                               * torch.randn(own.shape,
                                             generator=torch.Generator().manual_seed(0))) * batch.loss_mask
    return adapter, batch


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


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
        assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [True, False]
    settings = AlgorithmConfig()
    batch = batch.to("cpu")
    model.zero_grad(set_to_none=True)
    ref_lp = naive_update(model, batch, settings, 60, adapter.banned_token_ids)
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    policy = adapter.policy(model, 1.0)
    with torch.no_grad():
        lp, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    accumulate_gradients(policy, batch, [[0, 1], [2]], settings, 60)
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
        compile_layers(model)
        after, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_repeated_images_are_encoded_once_with_the_same_results(tiny_model, monkeypatch):
    """A GRPO-like batch (a prompt's image repeated over its group, plus an image one pixel away from
    another): with image sharing on, the vision tower sees each distinct image once, and the logprobs and
    every gradient (vision tower trainable) equal those of encoding every copy. The image grids are read on
    the host once a pass either way (the sharing's read is reused by the vision inputs' hook)."""
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
        rollouts.append(Rollout(prompt=prompt, completion_ids=comp, logprobs=[-1.0] * 60,
                                finish_reason="length",
                                advantage=float(torch.randn(1, generator=g))))
    batch = adapter.build_batch(rollouts)
    model = copy.deepcopy(tiny_model).train()  # every parameter trainable, the vision tower included
    rows_seen = []
    model.model.visual.patch_embed.register_forward_hook(lambda m, a, out: rows_seen.append(a[0].shape[0]))
    policy = adapter.policy(model, 1.0)
    grid_reads = []
    tolist = torch.Tensor.tolist

    def counted(t):
        # the micro-batch's image grids, (t, h, w) per image (one-row grids: the per-size inputs' host tensors)
        if t.dim() == 2 and t.shape[0] > 1 and t.shape[-1] == 3 and not t.is_floating_point():
            grid_reads.append(t.shape[0])
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    out = {}
    for shared in (False, True):
        set_image_sharing(model.model.visual, shared)
        rows_seen.clear()
        grid_reads.clear()
        model.zero_grad(set_to_none=True)
        lp, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
        (lp * batch.loss_mask).sum().backward()
        out[shared] = (lp.detach(), grads(model), list(rows_seen))
        assert grid_reads == [5], (shared, grid_reads)
    per_image = int(base[0].prompt.image_grid_thw.prod())
    assert out[False][2] == [5 * per_image]
    assert out[True][2] == [3 * per_image]  # base[0], base[1] and the near-twin
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    assert any("visual" in n for n in out[False][1])
    for name, ref in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], ref, atol=1e-5, rtol=1e-4, msg=name)


def test_vision_inputs_from_the_host_change_nothing(tiny_model_dir, adapter):
    """With transformers >= 5.19 the vision tower gets its grid-derived inputs (attention boundaries as a CPU
    tensor, rotary positions, position-table interpolation) from the host, built image size by image size
    and cached: they equal, to the bit, what transformers' helpers compute for the whole grid; no keyword is
    left over for the blocks; the patch embedding as a matmul equals the convolution; the features are
    transformers' own."""
    from transformers import AutoModelForImageTextToText, vision_utils

    from vlrl.adapters.fast_vision import supported

    if not supported():
        pytest.skip("this transformers takes no precomputed vision inputs (vlrl leaves the vision tower as "
                    "it is)")
    hooked = adapter.load_model(torch.float32)
    plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    visual = hooked.model.visual
    given, seen = [], []
    visual.register_forward_pre_hook(lambda m, a, k: given.append(dict(k)), with_kwargs=True)  # after vlrl's
    visual.blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.append((k["cu_seqlens"].device.type, sorted(k))), with_kwargs=True)
    # a repeated size: served from the cache
    grid = torch.tensor([[1, 8, 8], [1, 4, 12], [1, 8, 8], [1, 6, 4]])
    pv = torch.randn(int(grid.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = visual(pv, grid_thw=grid, return_dict=True)
        ref = plain.model.visual(pv, grid_thw=grid, return_dict=True)
        embed_ref = plain.model.visual.patch_embed(pv)
        embed = visual.patch_embed(pv)
    assert seen == [("cpu", ["cu_seqlens", "max_seqlen", "position_embeddings"])]
    idx, w = vision_utils.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    assert torch.equal(given[0]["interp_indices"], idx) and torch.equal(given[0]["interp_weights"], w)
    assert torch.equal(given[0]["position_ids"],
                       vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size))
    assert torch.equal(given[0]["cu_seqlens"], vision_utils.get_vision_cu_seqlens(grid))
    assert len(visual._vlrl_fast_vision["inputs"]) == 3
    assert rel_err(embed, embed_ref) < 1e-6  # float32: a matmul sums in another order than the convolution
    for a, b in zip([ours.pooler_output, *ours.deepstack_features],
                    [ref.pooler_output, *ref.deepstack_features]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("grids", [[[1, 8, 8]] * 3, [[1, 8, 8], [1, 4, 8], [1, 8, 4]]],
                         ids=["equal", "unequal"])
def test_vision_attention_matches_transformers(tiny_model_dir, adapter, grids):
    """The vision tower's attention routed through `vision_attention` (equal-size images in one batched call;
    otherwise one call per image): features and the gradients of a trainable tower are transformers' own,
    the language model's attention is vlrl's packed one (transformers' sdpa on padded batches), and nothing of
    it reaches a saved config."""
    from transformers import AutoModelForImageTextToText

    from vlrl.adapters.fast_vision import NAME, supported
    from vlrl.adapters.packing import NAME as PACKED

    if not supported():
        pytest.skip("this transformers has no precomputed cu_seqlens (vlrl leaves the vision tower as it is)")
    ours = adapter.load_model(torch.float32)
    plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert ours.model.visual.config._attn_implementation == NAME
    assert ours.model.language_model.config._attn_implementation == PACKED
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1536, generator=torch.Generator().manual_seed(0))
    weights = None
    out = {}
    for name, model in (("ours", ours), ("plain", plain)):
        model.model.visual.requires_grad_(True)
        feats = model.model.visual(pixels, grid_thw=grid, return_dict=True)
        every = [feats.pooler_output, *feats.deepstack_features]
        if weights is None:
            weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i))
                       for i, f in enumerate(every)]
        sum((f * w).sum() for f, w in zip(every, weights)).backward()
        out[name] = ([f.detach() for f in every],
                     {n: p.grad for n, p in model.model.visual.named_parameters() if p.grad is not None})
    for a, b in zip(out["ours"][0], out["plain"][0]):
        assert rel_err(a, b) < 1e-5
    assert set(out["ours"][1]) == set(out["plain"][1]) and out["plain"][1]
    for n, g in out["plain"][1].items():
        assert rel_err(out["ours"][1][n], g) < 1e-5, n


def test_equal_size_images_make_a_vision_block_one_graph(adapter):
    """With every image the same size, a vision block traces as one graph (fullgraph=True would raise at
    the per-image split transformers' own attention makes: a host read of the boundaries)."""
    from vlrl.adapters.fast_vision import supported

    if not supported():
        pytest.skip("this transformers has no precomputed cu_seqlens")
    model = adapter.load_model(torch.float32)
    block = model.model.visual.blocks[0]
    seen = {}
    block.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    grid = torch.tensor([[1, 8, 8]] * 2)
    with torch.no_grad():
        model.model.visual(torch.randn(128, 1536), grid_thw=grid, return_dict=True)
        ref = block(*seen["args"], **seen["kwargs"])
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(*seen["args"], **seen["kwargs"]), ref)


def test_deepstack_without_host_reads_is_bit_identical(tiny_model, case):
    """vlrl's deepstack add (integer indices found without a host read) gives transformers' logprobs and
    gradients bit for bit, and its forward and backward read nothing from the device."""
    from host_reads import HostReads

    adapter, batch = case
    model = copy.deepcopy(tiny_model).train()
    lm = model.model.language_model
    assert "_deepstack_process" in vars(lm)  # patched at load (patches.py)
    policy = adapter.policy(model, 1.0)
    runs = []
    for patched in (True, False):
        if not patched:
            del lm._deepstack_process  # transformers' own
        model.zero_grad(set_to_none=True)
        accumulate_gradients(policy, batch, [[0, 1], [2]], AlgorithmConfig(), 60)
        with torch.no_grad():
            lp, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
        runs.append((lp, grads(model)))
    (lp, g), (want_lp, want_g) = runs
    assert torch.equal(lp, want_lp)
    assert set(g) == set(want_g) and all(torch.equal(g[k], want_g[k]) for k in want_g)
    # the add alone, forward and backward: no host read (transformers' boolean index makes one each way)
    from vlrl.adapters.deepstack import _deepstack_process

    hidden = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:4] = mask[1, 5] = True
    feats = torch.randn(3, 16, requires_grad=True)
    with HostReads() as reads:
        out = _deepstack_process(lm, hidden, mask, feats)
        out.square().sum().backward()
    assert reads.reads == 0
    want = hidden.detach().clone()
    want[mask] += feats.detach()
    assert torch.equal(out.detach(), want)
    with HostReads() as reads:
        type(lm)._deepstack_process(lm, hidden, mask, feats).sum().backward()
    assert reads.reads > 0  # (the check above can fail)
