"""The token contract: loss mask exactly on sampled tokens, [B, L] aligned logprobs, pixel rows by patches."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrl.adapters.qwen3_vl import PromptError
from vlrl.batch import batch_logprobs, plan_micro_batches
from vlrl.records import Rollout


def image(w, h, rgb=(200, 10, 10)):
    return Image.new("RGB", (w, h), rgb)


def prompt(adapter, question, images=(), system=None, history=None):
    msgs = adapter.build_messages(question, len(images), system, history)
    return adapter.encode_prompt(msgs, list(images))


def ids(adapter, text):
    return adapter.tokenizer.encode(text, add_special_tokens=False)


def test_single_turn_mask_and_alignment(adapter):
    p = prompt(adapter, "What color is the shape?", [image(64, 64)])
    comp = ids(adapter, "red") + [adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    lps = [-0.5, -0.25]
    r = Rollout(prompt=p, completion_ids=comp, logprobs=lps, finish_reason="stop", advantage=1.5)
    b = adapter.build_batch([r])
    P = len(p.input_ids)
    assert b.input_ids.shape == b.loss_mask.shape == b.behavior_logprobs.shape == (1, P + 2)
    assert b.loss_mask[0].tolist() == [0.0] * P + [1.0, 1.0]
    assert b.behavior_logprobs[0, P:].tolist() == lps  # logprob of token t stored at t
    assert (b.behavior_logprobs[0, :P] == 0).all()
    assert b.input_ids[0, P:].tolist() == comp
    assert b.advantages.tolist() == [1.5]
    assert b.model_inputs["mm_token_type_ids"][0].tolist() == [int(t == adapter.image_token_id)
                                                               for t in p.input_ids] + [0, 0]


def test_multi_turn_mask_covers_each_generated_turn_only(adapter):
    """Prompt history is never trained; in a multi-turn rollout, environment tokens between turns are not."""
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        # earlier turn: prompt, not trained
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    p = prompt(adapter, "What color?", [image(64, 64)], system="Be brief.", history=history)
    turn1 = ids(adapter, "blue") + [adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    env = ids(adapter, "\n<|im_start|>user\nAre you sure?<|im_end|>\n<|im_start|>assistant\n")
    turn2 = ids(adapter, "yes") + [adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    comp = turn1 + env + turn2
    mask = [1] * len(turn1) + [0] * len(env) + [1] * len(turn2)
    lps = [-1.0] * len(turn1) + [0.0] * len(env) + [-2.0] * len(turn2)
    r = Rollout(prompt=p, completion_ids=comp, logprobs=lps, finish_reason="stop", completion_mask=mask)
    b = adapter.build_batch([r])
    P = len(p.input_ids)
    assert b.loss_mask[0, :P].sum() == 0
    assert b.loss_mask[0, P:].tolist() == [float(m) for m in mask]
    assert b.behavior_logprobs[0, P:].tolist() == [lp * m for lp, m in zip(lps, mask)]
    assert b.num_loss_tokens == len(turn1) + len(turn2)
    text = adapter.tokenizer.decode(p.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_images_mixed_with_image_less_samples_and_padding(adapter):
    p_two = prompt(adapter, "Compare", [image(64, 64), image(96, 128, (0, 0, 200))])
    p_none = prompt(adapter, "No image here")
    p_one = prompt(adapter, "One", [image(128, 64)])
    eot = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rs = [
        Rollout(prompt=p_none, completion_ids=[5, 6, eot], logprobs=[-1, -1, -1], finish_reason="stop"),
        Rollout(prompt=p_two, completion_ids=[7], logprobs=[-2], finish_reason="length"),
        Rollout(prompt=p_one, completion_ids=[8, 9], logprobs=[-3, -3], finish_reason="length"),
    ]
    b = adapter.build_batch(rs)
    assert b.images_per_sample == [0, 2, 1]
    # (w, h) 64x64 -> grid (t, h, w) 1x4x4; 96x128 -> 1x8x6; 128x64 -> 1x4x8 (patch 16)
    assert b.patches_per_sample == [0, 16 + 48, 32]
    assert b.model_inputs["pixel_values"].shape == (16 + 48 + 32, 1536)
    assert b.model_inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 6], [1, 4, 8]]
    assert (b.input_ids == adapter.image_token_id).sum(-1).tolist() == [0, 4 + 12, 8]
    # padding: no attention, no loss
    for i, r in enumerate(rs):
        n = len(r.prompt.input_ids) + len(r.completion_ids)
        assert b.attention_mask[i].sum() == n
        assert b.loss_mask[i, n:].sum() == 0 and (b.input_ids[i, n:] == adapter.pad_token_id).all()

    # selecting samples slices pixel rows by patch counts, not by sample index
    sub = b.select([2, 0])
    assert sub.model_inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    torch.testing.assert_close(sub.model_inputs["pixel_values"], p_one.pixel_values)
    assert sub.seq_len == max(len(p_one.input_ids) + 2, len(p_none.input_ids) + 3)
    only_text = b.select([0])
    assert "pixel_values" not in only_text.model_inputs


def test_micro_batches_give_the_same_logprobs_as_the_whole_batch(adapter, tiny_model):
    torch.manual_seed(0)
    prompts = [
        prompt(adapter, "What color is the shape?", [image(64, 64)]),
        prompt(adapter, "No image"),
        prompt(adapter, "Two images", [image(96, 64, (0, 200, 0)), image(64, 128, (0, 0, 200))]),
        prompt(adapter, "Wide", [image(128, 64, (9, 9, 9))]),
    ]
    rs = []
    for i, p in enumerate(prompts):
        comp = torch.randint(0, 300, (3 + 2 * i,)).tolist()
        rs.append(Rollout(prompt=p, completion_ids=comp, logprobs=[0.0] * len(comp), finish_reason="length"))
    b = adapter.build_batch(rs)
    policy = adapter.policy(tiny_model, 1.0)
    with torch.no_grad():
        whole, _ = batch_logprobs(policy, b)
        for groups in ([[0, 1], [2, 3]], [[3], [1], [0, 2]], [[0], [1], [2], [3]]):
            for g in groups:
                mb = b.select(g)
                part, _ = batch_logprobs(policy, mb)
                torch.testing.assert_close(part, whole[g, : mb.seq_len], atol=1e-5, rtol=1e-5)
    assert (whole != 0).sum() == b.num_loss_tokens


def test_host_positions_equal_transformers_own(adapter, tiny_model):
    """The batch's M-RoPE positions (built on the host) are exactly what transformers' get_rope_index computes
    in the forward, for images of several shapes, two images in one sample, an image-less sample and padding;
    and micro-batches carry their samples' positions."""
    prompts = [
        prompt(adapter, "Two images", [image(96, 64, (0, 200, 0)), image(64, 128, (0, 0, 200))]),
        prompt(adapter, "No image"),
        prompt(adapter, "Wide", [image(128, 64, (9, 9, 9))]),
        prompt(adapter, "Tall and small", [image(32, 96)]),
    ]
    rs = [Rollout(prompt=p, completion_ids=list(range(5, 5 + 2 + 3 * i)), logprobs=[0.0] * (2 + 3 * i),
                  finish_reason="length") for i, p in enumerate(prompts)]
    b = adapter.build_batch(rs)
    inputs = b.model_inputs
    want, _ = tiny_model.model.get_rope_index(
        b.input_ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=b.attention_mask,
    )
    assert inputs["position_ids"].shape == (3, b.size, b.seq_len)
    assert torch.equal(inputs["position_ids"], want)
    # image rows really differ per axis (the check could fail): height and width positions of sample 0's image
    img = b.input_ids[0] == adapter.image_token_id
    assert not torch.equal(inputs["position_ids"][1, 0][img], inputs["position_ids"][2, 0][img])
    sub = b.select([3, 1])
    assert torch.equal(sub.model_inputs["position_ids"], want[:, [3, 1], : sub.seq_len])


def test_logprobs_with_host_positions_equal_the_models_own(adapter, tiny_model):
    rs = [
        Rollout(prompt=prompt(adapter, "Two", [image(96, 64), image(64, 128, (0, 0, 200))]),
                completion_ids=[5, 6, 7],
                logprobs=[0.0] * 3, finish_reason="length"),
        Rollout(prompt=prompt(adapter, "None"), completion_ids=[8, 9], logprobs=[0.0] * 2,
                finish_reason="length"),
    ]
    b = adapter.build_batch(rs)
    policy = adapter.policy(tiny_model, 1.0)
    with torch.no_grad():
        ours, _ = batch_logprobs(policy, b)
        inputs = {k: v for k, v in b.model_inputs.items() if k != "position_ids"}
        theirs, _ = policy(b.input_ids, b.attention_mask, b.loss_mask, **inputs)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_positions_refuse_placeholders_that_do_not_match_the_grid():
    from vlrl.adapters.mrope import mrope_positions

    ids = torch.tensor([[1, 9, 9, 9, 2]])  # a run of 3 placeholders
    with pytest.raises(ValueError, match="grid 1x4x4 needs 4"):
        mrope_positions(ids, torch.ones_like(ids), torch.tensor([[1, 4, 4]]), 9, 2)
    with pytest.raises(ValueError, match="more image placeholder runs"):
        mrope_positions(ids, torch.ones_like(ids), None, 9, 2)
    with pytest.raises(ValueError, match="2 image grids but 1"):
        mrope_positions(torch.tensor([[1, 9, 9, 9, 9, 2]]), torch.ones(1, 6), torch.tensor([[1, 4, 4]] * 2),
                        9, 2)


def test_placeholder_count_is_checked(adapter):
    p = prompt(adapter, "x", [image(64, 64)])
    bad = list(p.input_ids)
    bad.remove(adapter.image_token_id)
    with pytest.raises(PromptError, match="3 <\\|image_pad\\|> tokens but the image grid needs 4"):
        adapter.check_placeholders(bad, p.image_grid_thw, "sample 7")


def test_sampled_placeholder_is_refused(adapter):
    p = prompt(adapter, "x", [image(64, 64)])
    r = Rollout(prompt=p, completion_ids=[adapter.image_token_id], logprobs=[-1.0], finish_reason="length")
    with pytest.raises(ValueError, match="placeholder"):
        adapter.build_batch([r])


def test_too_many_images_and_too_long_prompts_are_refused(adapter, model_cfg):
    with pytest.raises(PromptError, match="5 images is over model.max_images_per_prompt"):
        prompt(adapter, "x", [image(64, 64)] * 5)
    from vlrl.adapters.qwen3_vl import Qwen3VLAdapter

    small = Qwen3VLAdapter(adapter.processor, model_cfg.model_copy(update={"max_model_len": 20}))
    with pytest.raises(PromptError, match="not below model.max_model_len"):
        prompt(small, "What color is the shape?", [image(128, 128)])


def test_plan_micro_batches_respects_samples_and_tokens():
    assert plan_micro_batches([5, 5, 5, 5, 5], max_samples=2) == [[0, 1], [2, 3], [4]]
    # padded tokens = samples * longest: [10, 10] = 20 fits 20; adding 30 would make 90
    assert plan_micro_batches([10, 10, 30, 5, 5], max_samples=8, max_tokens=60) == [[0, 1], [2, 3], [4]]
    assert plan_micro_batches([100], max_samples=8, max_tokens=60) == [[0]]  # a single sample always goes


def test_check_batch_catches_positions_that_differ_from_the_models(adapter, tiny_model):
    """`vlrl check-batch`'s positions check fails (naming the count) when the batch's positions are not the
    model's: what a transformers with changed M-RoPE rules would look like."""
    from vlrl.check_batch import Report, check_positions

    r = Rollout(prompt=prompt(adapter, "x", [image(64, 64)]), completion_ids=[5, 6], logprobs=[0.0, 0.0],
                finish_reason="length")
    b = adapter.build_batch([r])
    good = Report()
    check_positions(b, adapter, tiny_model, good)
    assert good.ok and good.checks[0].name == "M-RoPE positions"
    b.model_inputs["position_ids"][2, 0, 5] += 1  # one width position off
    bad = Report()
    check_positions(b, adapter, tiny_model, bad)
    assert not bad.ok and bad.checks[0].detail.startswith("1 of ")
