"""The token contract with Qwen's real vocabulary (151,643 BPE ranks, 151,936 ids): the tokenizer built
offline equals tiktoken's encoding on the same ranks; tool calls are dozens of tokens; a reply appended to
sampled ids is the whole chat tokenised; calls and answers are read from the sampled ids' text; and the
in-process sampler's multi-turn episodes (the warm-started tiny model calls the built-in tools) agree with the
trainer.

Tolerances are measured, not guessed: float32 trainer vs sampler on 151,936 logits differs by 1e-5..3e-4 per
token (the toy vocabulary: ~1e-6), and mismatch KL stays below 1e-7.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrl.envs.calculator import CalculatorEnv
from vlrl.envs.tools import parse_tool_calls
from vlrl.tiny_warm_start import tool_call_text

TEXTS = ["Hello world", "你好，世界！这是一个测试。", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧",
         '{"a": [1, 2.5e-3], "b": {"c": null}}\n',
         "   leading spaces\n\n\n\ttabs and  double  spaces  ",
         "def f(x):\n    return x ** 2  # 12345678\r\n",
         "Ünïcödé café naïve résumé", "I'm, you're, they'll, it's, we'd", "\\boxed{\\frac{3}{4}} and $x^2$"]


def test_the_tokenizer_is_qwens_token_for_token():
    import tiktoken

    from vlrl.qwen_vocab import QWEN2_PATTERN, build_qwen_tokenizer, qwen_ranks

    tok = build_qwen_tokenizer()
    reference = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=qwen_ranks(),
                                  special_tokens={})
    for text in TEXTS:
        assert tok.encode(text).ids == reference.encode(text), text
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("Hello world").ids == [9707, 1879]


def test_the_tiny_model_has_qwens_ids_and_vocabulary_size(qadapter, qwen_model_dir):
    import json

    tok = qadapter.tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                     "<tool_call>",
                                     "</tool_call>", "</think>"])
    assert ids == [151643, 151645, 151655, 151656, 151657, 151658, 151668]
    assert json.loads((qwen_model_dir / "config.json").read_text())["text_config"]["vocab_size"] == 151936
    assert qadapter.eos_token_ids == [151643, 151645] and qadapter.tool_call_end_ids == [151658]
    special = {t for t in tok.all_special_tokens}
    assert "<|im_end|>" in special and "<tool_call>" not in special  # tags are text to decode, not special


def test_a_tool_call_is_dozens_of_tokens_and_reads_back_from_its_ids(qadapter):
    tok = qadapter.tokenizer
    call = tool_call_text("crop", {"x0": 0, "y0": 128, "x1": 128, "y1": 256})
    ids = tok(call + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert 40 <= len(ids) <= 50 and ids[0] == 151657 and ids[-2:] == [151658, 151645]
    assert tok.convert_tokens_to_ids("}}Ċ") in ids  # `}}\n` is one token (byte-level spelling)
    assert all(len(tok(d, add_special_tokens=False)["input_ids"]) == 1 for d in "0123456789")
    text = qadapter.completion_text(ids)
    assert text == call  # the tags kept, <|im_end|> left out: what the environment reads
    (parsed,) = parse_tool_calls(text)
    assert (parsed.name,
            parsed.arguments, parsed.error) == ("crop", {"x0": 0, "y0": 128, "x1": 128, "y1": 256}, None)
    # a turn the sampler stopped at </tool_call> (no <|im_end|>) reads the same
    assert qadapter.completion_text(ids[:-1]) == call


def test_rewards_read_answers_from_real_vocabulary_text(qadapter):
    from vlrl.rewards.builtin import BUILTIN_REWARDS
    from vlrl.sample import Sample

    tok = qadapter.tokenizer
    cases = [("numeric", "The product is 23,088.\n\\boxed{23088}", 23088),
             ("math", "<think>3/4 of it</think> So the answer is $\\boxed{\\frac{3}{4}}$.", "0.75"),
             ("choice", "<think>maybe red</think>It is blue.", "blue")]
    for fn, said, answer in cases:
        ids = tok(said + "<|im_end|>", add_special_tokens=False)["input_ids"]
        text = qadapter.completion_text(ids)
        assert text == said
        if fn == "math":
            from vlrl.rewards.math_reward import math_reward as reward
        else:
            reward = BUILTIN_REWARDS[fn]
        sample = Sample(id="s", question="q", answer=answer, meta={"options": ["red", "green", "blue"]})
        assert reward(text, sample) == 1.0, (fn, text)


def test_a_reply_appended_to_sampled_ids_is_the_whole_chat_tokenised_with_qwens_vocabulary(qadapter):
    env = CalculatorEnv()
    image, crop = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))
    question = qadapter.build_messages("What is 12 * 34?", 1)
    prompt = qadapter.encode_prompt(question, [image], tools=env.schemas())
    said = "Let me compute it.\n" + tool_call_text("calculate", {"expression": "12 * 34"})
    tok = qadapter.tokenizer
    for close_turn in (False, True):  # a turn ended by <|im_end|>, or stopped at its </tool_call>
        sampled = tok(said, add_special_tokens=False)["input_ids"] + ([] if close_turn else [151645])
        reply_msgs = [{"role": "tool", "content": [{"type": "text", "text": "408"}]},
                      {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "a picture"}]}]
        reply = qadapter.encode_reply(reply_msgs, [crop], close_turn=close_turn)
        whole = qadapter.processor.apply_chat_template(
            question + [{"role": "assistant", "content": said}] + reply_msgs, tools=env.schemas(),
            tokenize=False,
            add_generation_prompt=True)
        size = {"shortest_edge": qadapter.cfg.min_pixels, "longest_edge": qadapter.cfg.max_pixels}
        enc = qadapter.processor(text=[whole], images=[image, crop], size=size, return_tensors="pt")
        assert prompt.input_ids + sampled + reply.input_ids == enc["input_ids"][0].tolist()
        assert torch.equal(torch.cat([prompt.image_grid_thw, reply.image_grid_thw]), enc["image_grid_thw"])


@pytest.mark.slow
@pytest.mark.parametrize("env_name", ["zoom", "calculator"])
def test_in_process_tool_episodes_with_qwens_vocabulary_match_the_trainer(
    qadapter, qwen_model, qwen_model_dir,
                                                                          tmp_path, env_name):
    """The warm-started model writes real tool calls (~45 tokens each): the episodes have several turns, the
    environment runs the calls it reads from the sampled ids, and the trainer's logprobs of every sampled
    token (151,936 logits each) agree with the in-process sampler's."""
    from vlrl.data.sources import load_samples
    from vlrl.rollout.embedded import EmbeddedSampler
    from vlrl.rollout.groups import RolloutGroups

    from conftest import tiny_config
    from vllm_server import trainer_logprobs

    cfg = tiny_config(qwen_model_dir, tmp_path, f"env.dataset=builtin:{env_name}", "model.max_model_len=2048",
                      "rollout.max_new_tokens=64", "env.max_turns=3", "model.max_pixels=16384")
    sampler = EmbeddedSampler(qwen_model, qadapter, cfg.rollout)
    got = RolloutGroups(cfg, qadapter, sampler).score_groups(load_samples(cfg.env, "train", 0)[:2], 4, 0)
    rollouts = got.rollouts
    assert sum(r.tool_calls for r in rollouts) >= 4 and max(r.turns for r in rollouts) >= 2, \
        [(r.turns, r.tool_calls, r.text[:80]) for r in rollouts]
    if env_name == "zoom":
        assert sum(len(r.env_images) for r in rollouts) >= 2
    stats = trainer_logprobs(qadapter, qwen_model, rollouts)
    assert stats["mismatch_kl"] < 1e-7 and stats["max_abs_diff"] < 1e-3, stats
