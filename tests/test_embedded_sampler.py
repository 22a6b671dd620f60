"""The in-process sampler: behavior logprobs equal the trainer's, placeholders are never sampled."""

from __future__ import annotations

import copy

import torch
from PIL import Image

from vlrl.batch import batch_logprobs
from vlrl.check_batch import mismatch_stats
from vlrl.config import RolloutConfig
from vlrl.rollout.embedded import EmbeddedSampler


def prompts(adapter):
    out = []
    for i, rgb in enumerate([(220, 30, 30), (30, 60, 220)]):
        msgs = adapter.build_messages("What color is the shape?", 1, "You are a helpful assistant.")
        out.append(adapter.encode_prompt(msgs, [Image.new("RGB", (64 + 32 * i, 96), rgb)]))
    out.append(adapter.encode_prompt(adapter.build_messages("Say something.", 0), []))
    return out


def test_trainer_logprobs_equal_sampler_logprobs(adapter, tiny_model):
    for temperature in (1.0, 0.7):
        sampler = EmbeddedSampler(tiny_model, adapter,
                                  RolloutConfig(max_new_tokens=16, temperature=temperature))
        rollouts = sampler.sample(prompts(adapter), n=4, seed=0)
        assert len(rollouts) == 12 and [r.group for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
        batch = adapter.build_batch(rollouts)
        with torch.no_grad():
            lp, _ = batch_logprobs(adapter.policy(tiny_model, temperature), batch)
        stats = mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)
        assert stats["tokens"] == batch.num_loss_tokens > 50
        assert stats["max_abs_diff"] < 1e-5, stats


def test_checkpoint_generation_defaults_do_not_override_the_config(adapter, tiny_model):
    """Qwen checkpoints ship top_k/top_p/temperature/repetition_penalty defaults; the config must win."""
    model = copy.deepcopy(tiny_model)
    gc = model.generation_config
    gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.min_new_tokens = 3, 0.5, 0.2, 1.5, 4
    sampler = EmbeddedSampler(model, adapter, RolloutConfig(max_new_tokens=12, temperature=1.0))
    rollouts = sampler.sample(prompts(adapter), n=4, seed=1)
    batch = adapter.build_batch(rollouts)
    with torch.no_grad():
        lp, _ = batch_logprobs(adapter.policy(model, 1.0), batch)
    assert mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)["max_abs_diff"] < 1e-5
    # with top_k=3 in force, 16 samples of a near-uniform model would repeat tokens; at temperature 1 over
    # ~400 tokens they rarely do
    assert len({t for r in rollouts for t in r.completion_ids}) > 30


def test_placeholders_are_never_sampled_even_when_the_model_prefers_them(adapter, tiny_model):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():  # make <|image_pad|> and <|video_pad|> by far the most likely next tokens
        bias = torch.zeros(model.config.text_config.vocab_size)
        bias[adapter.banned_token_ids] = 50.0
        head = model.get_output_embeddings()
        model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        model.lm_head.weight = head.weight
        model.lm_head.bias.data = bias
    sampler = EmbeddedSampler(model, adapter, RolloutConfig(max_new_tokens=8))
    rollouts = sampler.sample(prompts(adapter), n=8, seed=0)
    sampled = [t for r in rollouts for t in r.completion_ids]
    assert len(sampled) > 0 and not set(sampled) & set(adapter.banned_token_ids)


def test_finish_reasons_and_seeded_determinism(adapter, tiny_model):
    sampler = EmbeddedSampler(tiny_model, adapter, RolloutConfig(max_new_tokens=3))
    a = sampler.sample(prompts(adapter), n=3, seed=5)
    b = sampler.sample(prompts(adapter), n=3, seed=5)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    for r in a:
        ended = r.completion_ids[-1] in adapter.eos_token_ids
        assert r.finish_reason == ("stop" if ended else "length")
        assert len(r.completion_ids) <= 3 and len(r.logprobs) == len(r.completion_ids)
        assert all(lp < 0 for lp in r.logprobs)

    # a model that always ends its turn: every completion is exactly one <|im_end|>, finish "stop"
    model = copy.deepcopy(tiny_model)
    eot = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head = torch.nn.Linear(128, model.config.text_config.vocab_size, bias=True)
        model.lm_head.weight.data.zero_()
        model.lm_head.bias.data.fill_(-30.0)
        model.lm_head.bias.data[eot] = 30.0
    stop = EmbeddedSampler(model, adapter, RolloutConfig(max_new_tokens=5)).sample(prompts(adapter)[:1], n=2)
    assert [r.completion_ids for r in stop] == [[eot], [eot]]
    assert {r.finish_reason for r in stop} == {"stop"} and stop[0].text == ""


def test_static_cache_sampler_logprobs_equal_the_trainer(adapter, tiny_model):
    sampler = EmbeddedSampler(tiny_model, adapter, RolloutConfig(max_new_tokens=10, static_cache=True))
    rollouts = sampler.sample(prompts(adapter), n=3, seed=0)
    batch = adapter.build_batch(rollouts)
    with torch.no_grad():
        lp, _ = batch_logprobs(adapter.policy(tiny_model, 1.0), batch)
    assert mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)["max_abs_diff"] < 1e-5
