"""Multi-turn environments: tool calls in Qwen3-VL's format, replies rendered once and appended (token-exact),
budgets, failures, and the trainer's logprobs against the sampler's across turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlrl.batch import batch_logprobs
from vlrl.check_batch import mismatch_stats
from vlrl.envs.calculator import CalculatorEnv, evaluate
from vlrl.envs.environment import Environment
from vlrl.envs.tools import Call, Tool, parse_tool_calls, run_tool_calls
from vlrl.errors import UserError
from vlrl.records import Rollout
from vlrl.rollout.episodes import run_episodes
from vlrl.rollout.groups import RolloutGroups
from vlrl.summary import read_jsonl
from vlrl.train import train

from conftest import tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def cfg(tiny_model_dir, tmp_path, *extra):
    return tiny_config(tiny_model_dir, tmp_path, "env.environment=envs_for_tests:ImageEveryTurn",
                       "env.max_turns=3",
                       *extra)


class Scripted:
    """Writes the given turns, one per call (the last one again after that), each closed by <|im_end|> unless
    `cut` (then it ends by length): a model whose every word the test chooses, to drive an environment into
    each of its cases. Logprob -1 per token. (Logprob agreement is tested with the real samplers below.)"""

    def __init__(self, adapter, turns: list, cut: bool = False):
        self.adapter, self.turns, self.cut, self.calls = adapter, turns, cut, 0

    def sample(self, prompts, n, seed=None):
        turn = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        tok = self.adapter.tokenizer
        ids = turn if isinstance(turn, list) else tok.encode(turn, add_special_tokens=False)
        ids = ids + ([] if self.cut or ids[-1] in self.adapter.tool_call_end_ids
                     else [tok.convert_tokens_to_ids("<|im_end|>")])
        return [Rollout(prompt=p, completion_ids=list(ids), logprobs=[-1.0] * len(ids),
                        finish_reason="length" if self.cut else "stop",
                        text=tok.decode(ids, skip_special_tokens=True),
                        group=g) for g, p in enumerate(prompts) for _ in range(n)]


def episodes(adapter, env, sampler, config, n=2):
    from vlrl.data.sources import load_samples

    samples = load_samples(config.env, "train", 0)[:2]
    prompts = [adapter.encode_prompt(adapter.build_messages(s.question, 1), s.images,
                                     tools=env.schemas() or None)
               for s in samples]
    return run_episodes(env, adapter, sampler, prompts, samples, n, 0, config)


# --- tool calls ---------------------------------------------------------------------------------------------
def test_tool_calls_are_parsed_as_qwen_writes_them():
    text = ('Let me look.\n<tool_call>\n{"name": "crop", "arguments": {"x0": 1, "y0": 2, "x1": 3, "y1": '
            '4}}\n</tool_call>'
            '\n<tool_call>\n{"name": "calculate", "arguments": "{\\"expression\\": \\"1+1\\"}"}\n</tool_call>'
            '\n<tool_call>{"name": "crop", "arguments": {"x0": 9')
    a, b, c = parse_tool_calls(text)
    assert (a.name, a.arguments, a.error) == ("crop", {"x0": 1, "y0": 2, "x1": 3, "y1": 4}, None)
    assert (b.name, b.arguments) == ("calculate", {"expression": "1+1"})  # arguments written as a JSON string
    assert c.error[0] == "malformed"  # the unclosed last call counts (vLLM's parser's rule), and is cut short
    assert parse_tool_calls("no call here") == []
    assert parse_tool_calls('<tool_call>["crop"]</tool_call>')[0].error[0] == "malformed"
    assert parse_tool_calls('<tool_call>{"name": "crop", "arguments": '
                            '3}</tool_call>')[0].error[0] == "bad_arguments"


def test_every_kind_of_failed_call_is_a_result_the_model_reads_and_is_counted():
    def hang(sample, state):
        time.sleep(30)

    def boom(sample, state):
        raise RuntimeError("disk on fire")

    obj = {"type": "object", "properties": {}, "additionalProperties": False}
    tools = {t.name: t for t in (
        Tool("echo", "", {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]},
             lambda sample, state, s: [s, Image.new("RGB", (8, 8))]),
        Tool("boom", "", obj, boom), Tool("hang", "", obj, hang))}
    calls = [Call("echo", {"s": "hi"}), Call("nope"), Call("echo", {"s": 3}), Call("boom"), Call("hang"),
             Call(error=("malformed", "bad JSON"))]
    t0 = time.time()
    messages, images, errors = run_tool_calls(calls, tools, None, {}, timeout_s=0.5)
    assert time.time() - t0 < 5  # the hung tool cost its timeout, not 30 s
    assert errors == {"unknown_tool": 1, "bad_arguments": 1, "raised": 1, "timeout": 1, "malformed": 1}
    assert [m["role"] for m in messages] == ["tool"] * 6 and len(images) == 1
    texts = [" ".join(p.get("text", "<image>") for p in m["content"]) for m in messages]
    assert texts[0] == "hi <image>"  # text and image, in the order the tool returned them
    assert "there is no tool 'nope' (tools: boom, echo, hang)" in texts[1]
    assert "bad arguments for echo: 3 is not of type 'string'" in texts[2]
    assert texts[3] == "Error: boom failed: RuntimeError: disk on fire"
    assert texts[4] == "Error: hang did not return within 0.5 s" and texts[5] == "Error: bad JSON"


def test_calculator_evaluates_arithmetic_and_nothing_else():
    assert evaluate("(12 + 3) * 4 - 2 ** 3 / 8") == 59.0
    for bad in ("__import__('os')", "x + 1", "2 ** 1000", "1 +"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_calculator_bounds_every_intermediate_result_so_nesting_cannot_hang_it():
    from vlrl.envs.calculator import calculate

    # just below 1e100
    assert evaluate("2 ** 332") == 2**332 and evaluate("2 ** 0.5") == pytest.approx(1.41421356)
    t0 = time.perf_counter()
    for bad in ("(((10**64)**64)**64)**64", "((2**64)**64)**64", "10**99 * 10**99", "1e308 * 10",
                "(1e-99) ** -5",
                "9 ** 9 ** 9", "1 ** 100000000000", "(-8) ** 0.5"):
        with pytest.raises(ValueError, match="too large|not a real number"):
            evaluate(bad)
    assert time.perf_counter() - t0 < 3.0  # was 12.5 s for the first alone, holding the GIL past any timeout
    messages, _, errors = run_tool_calls([Call("calculate", {"expression": "(((10**64)**64)**64)**64"})],
                                         {"calculate": CalculatorEnv.tools[0]}, None, {}, 2.0)
    assert errors == {"raised": 1} and "a result is too large" in messages[0]["content"][0]["text"]
    assert calculate(None, {}, "9.9e99 / 3") == "3.3e+99"  # a large result is text, no OverflowError


# --- token-exact replies ------------------------------------------------------------------------------------
def test_a_reply_appended_to_the_sampled_ids_is_the_whole_chat_tokenised(adapter):
    """prompt ids + sampled ids + the reply's ids == the processor's ids of the whole chat, images included:
    the reply is rendered once, after the turn, and nothing before it is rendered or tokenised again."""
    env = CalculatorEnv()
    image, crop = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))
    question = adapter.build_messages("What is 12 * 34?", 1)
    prompt = adapter.encode_prompt(question, [image], tools=env.schemas())
    said = ('Let me compute.\n<tool_call>\n{"name": "calculate", "arguments": {"expression": "12 * 34"}}'
            '\n</tool_call>')
    tok = adapter.tokenizer
    sampled = tok.encode(said, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    reply_msgs = [{"role": "tool", "content": [{"type": "text", "text": "408"}]},
                  {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "a picture"}]}]
    reply = adapter.encode_reply(reply_msgs, [crop])
    whole = adapter.processor.apply_chat_template(question + [{"role": "assistant", "content": said}]
                                                  + reply_msgs,
                                                  tools=env.schemas(), tokenize=False,
                                                  add_generation_prompt=True)
    size = {"shortest_edge": adapter.cfg.min_pixels, "longest_edge": adapter.cfg.max_pixels}
    enc = adapter.processor(text=[whole], images=[image, crop], size=size, return_tensors="pt")
    assert prompt.input_ids + sampled + reply.input_ids == enc["input_ids"][0].tolist()
    assert torch.equal(torch.cat([prompt.image_grid_thw, reply.image_grid_thw]), enc["image_grid_thw"])
    assert torch.equal(torch.cat([prompt.pixel_values, reply.pixel_values]), enc["pixel_values"])
    text = tok.decode(reply.input_ids)
    assert text.startswith("\n<|im_start|>user\n<tool_response>\n408\n</tool_response>\n<tool_response>\n")
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")  # two results, one user turn


def test_turns_masks_images_and_positions_are_accounted_per_turn(
    adapter, tiny_model, tmp_path, tiny_model_dir):
    from envs_for_tests import ImageEveryTurn

    config = cfg(tiny_model_dir, tmp_path)
    turn = "I need another look."
    rollouts, bad = episodes(adapter, ImageEveryTurn(), Scripted(adapter, [turn]), config)
    assert bad == [] and len(rollouts) == 4
    said = len(adapter.tokenizer.encode(turn, add_special_tokens=False)) + 1
    for r in rollouts:
        # no reply after the last turn
        assert (r.turns, r.finish_reason, len(r.env_images)) == (3, "max_turns", 2)
        # 0.25 a reply, all three
        assert sum(r.trained_mask) == 3 * said and r.env_reward == pytest.approx(0.75)
        untrained = [lp for lp, m in zip(r.logprobs, r.trained_mask) if not m]
        assert untrained == [0.0] * (len(r.logprobs) - 3 * said)
        # turn 1 first, turn 3 last: prompt-side between
        assert r.completion_ids[:said] == r.completion_ids[-said:]
        # 96x64, then 64x64
        assert r.num_images == 3 and r.image_grid_thw.tolist()[1:] == [[1, 4, 6], [1, 4, 4]]
    batch = adapter.build_batch(rollouts)
    assert batch.model_inputs["pixel_values"].shape[0] == sum(r.num_patches for r in rollouts)
    assert batch.num_loss_tokens == 4 * 3 * said
    theirs = adapter.reference_positions(tiny_model, batch)
    real = batch.attention_mask.bool().expand_as(theirs)
    assert torch.equal(batch.model_inputs["position_ids"][real], theirs[real])  # images mid-sequence included


def test_budgets_end_an_episode_with_a_reason_of_their_own(adapter, tmp_path, tiny_model_dir):
    from envs_for_tests import ImageEveryTurn

    env = ImageEveryTurn()
    images, _ = episodes(adapter, env, Scripted(adapter, ["more"]), cfg(tiny_model_dir, tmp_path,
                                                                          "model.max_images_per_prompt=2"))
    assert {(r.turns, r.finish_reason, len(r.env_images)) for r in images} == {(2, "images", 1)}
    short = cfg(tiny_model_dir, tmp_path, "model.max_model_len=120", "rollout.max_new_tokens=4",
                "env.max_turns=50",
                "model.max_images_per_prompt=50")  # only the context binds
    context, _ = episodes(adapter, env, Scripted(adapter, ["more"]), short)
    assert all(r.finish_reason == "context" and len(r.prompt.input_ids) + len(r.completion_ids) < 120
               for r in context)
    cut, _ = episodes(adapter, env, Scripted(adapter, ["more and more"], cut=True),
                      cfg(tiny_model_dir, tmp_path))
    assert {(r.turns, r.finish_reason) for r in cut} == {(1, "length")}  # an unfinished turn ends the episode


def test_failed_tool_calls_are_answered_and_the_episode_goes_on(adapter, tmp_path, tiny_model_dir):
    turns = ['<tool_call>{"name": "calculate"', '<tool_call>{"name": "calc", "arguments": {}}</tool_call>',
             '<tool_call>{"name": "calculate", "arguments": {"expression": 7}}</tool_call>',
             '<tool_call>{"name": "calculate", "arguments": {"expression": "6 * '
             '7"}}</tool_call>', "It is 42."]
    config = cfg(tiny_model_dir, tmp_path, "env.max_turns=6", "model.max_model_len=2048")
    rollouts, bad = episodes(adapter, CalculatorEnv(), Scripted(adapter, turns), config, n=1)
    assert bad == []
    for r in rollouts:
        assert (r.turns, r.finish_reason, r.tool_calls, r.text) == (5, "stop", 4, "It is 42.")
        assert r.tool_errors == {"malformed": 1, "unknown_tool": 1, "bad_arguments": 1}
        assert ("there is no tool 'calc'" in r.transcript
                and "<tool_response>\n42\n</tool_response>" in r.transcript)


def test_a_hung_tool_costs_its_timeout_and_the_model_is_told(adapter, tmp_path, tiny_model_dir):
    class Hangs(Environment):
        tools = [Tool("wait", "", {"type": "object"}, lambda sample, state: time.sleep(60))]

    env = Hangs()
    env.tool_timeout_s = 0.5
    t0 = time.time()
    rollouts, _ = episodes(adapter, env,
                           Scripted(adapter, ['<tool_call>{"name": "wait"}</tool_call>', "done"]),
                           cfg(tiny_model_dir, tmp_path), n=1)
    assert time.time() - t0 < 10
    assert all(r.tool_errors == {"timeout": 1} and "wait did not return within 0.5 s" in r.transcript
               for r in rollouts)


def test_a_turn_that_stops_at_its_tool_call_is_closed_by_the_environment(adapter, tmp_path, tiny_model_dir):
    """builtin:zoom stops each turn at its call (`</tool_call>`): the reply then begins with the <|im_end|>
    the model did not write, as prompt (mask 0), and the crop comes back at full resolution."""
    from vlrl.envs.zoom import ZoomEnv
    from vlrl.tiny_model import ZOOM_CALLS

    tok = adapter.tokenizer
    call = tok.encode(ZOOM_CALLS[0], add_special_tokens=False)
    assert call[-1] in adapter.tool_call_end_ids
    config = tiny_config(tiny_model_dir, tmp_path, "env.dataset=builtin:zoom")
    rollouts, _ = episodes(adapter, ZoomEnv(), Scripted(adapter, [call, "red"]), config, n=1)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for r in rollouts:
        assert (r.turns, r.tool_calls, r.tool_errors, r.finish_reason) == (2, 1, {}, "stop")
        assert r.completion_ids[:2] == [call[0], end] and r.trained_mask[:2] == [1, 0]
        assert r.env_image_grid_thw.tolist() == [[1, 8, 8]]  # the 128x128 quadrant, not shrunk


def test_zoom_colour_shows_only_in_a_crop_and_the_first_crop_holding_the_square_earns_a_little(adapter):
    import numpy as np

    from vlrl.data.builtin import builtin_split
    from vlrl.envs.zoom import COLORS, ZoomEnv

    for s in builtin_split("zoom", "train", 6, 64):
        img = s.images[0]
        x0, y0, x1, y1 = img.info["box"]
        whole = np.asarray(adapter.load_image(img), dtype=float)  # the pixel policy: 256 -> 128
        square = whole[y0 // 2 + 1 : y1 // 2 - 1, x0 // 2 + 1 : x1 // 2 - 1]
        # grey, whatever the colour
        assert np.abs(square - 127.5).max() <= 4 and np.ptp(square, axis=-1).max() <= 1
        qx, qy = (x0 // 128) * 128, (y0 // 128) * 128
        # a quadrant: not resized
        crop = np.asarray(adapter.load_image(img.crop((qx, qy, qx + 128, qy + 128))))
        assert (crop == COLORS[s.answer][0]).all(-1).sum() >= (x1 - x0) ** 2 // 2  # the colour, plain
        env, state = ZoomEnv(), {}
        call = ('<tool_call>{"name": "crop", "arguments": {"x0": %d, "y0": %d, "x1": %d, "y1": %d}}'
                '</tool_call>')
        miss = env.step(s, state, call % (0, 0, 1, 1))
        hit = env.step(s, state, call % (qx, qy, qx + 128, qy + 128))
        again = env.step(s, state, call % (0, 0, 256, 256))
        assert (miss.reward, hit.reward, again.reward) == (None, 0.25, None) and len(hit.images) == 1


# --- failures of the environment itself ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["Reset", "Step"])
def test_an_environment_that_raises_makes_a_bad_sample(adapter, tmp_path, tiny_model_dir, where):
    from vlrl.data.sources import load_samples

    config = cfg(tiny_model_dir, tmp_path, f"env.environment=envs_for_tests:RaisesIn{where}")
    groups = RolloutGroups(config, adapter, Scripted(adapter, ["red"]))  # turns that end: step is called
    samples = load_samples(config.env, "train", 0)[:3]
    got = groups.score_groups(samples, 2, 0)
    assert [s.id for s, _ in got.bad_samples] == ["colors-train-1"]
    assert f"the environment failed in {where.lower()}" in got.bad_samples[0][1]
    assert {r.sample.id for r in got.rollouts} == {"colors-train-0", "colors-train-2"}
    strict = cfg(tiny_model_dir, tmp_path, f"env.environment=envs_for_tests:RaisesIn{where}",
                 "env.on_bad_sample=error")
    with pytest.raises(UserError, match="colors-train-1: the environment failed"):
        RolloutGroups(strict, adapter, Scripted(adapter, ["red"])).score_groups(samples, 2, 0)


def test_unknown_environment_is_refused_by_name(adapter, tmp_path, tiny_model_dir):
    from vlrl.envs.environment import load_environment

    with pytest.raises(UserError, match="env.environment 'builtin:nope': no such built-in environment"):
        load_environment(cfg(tiny_model_dir, tmp_path, "env.environment=builtin:nope").env)
    with pytest.raises(UserError, match="cannot load it"):
        load_environment(cfg(tiny_model_dir, tmp_path, "env.environment=nosuchmodule:Env").env)


# --- the real samplers across turns -------------------------------------------------------------------------
def test_trainer_logprobs_equal_the_in_process_samplers_across_turns(
    adapter, tiny_model, tmp_path, tiny_model_dir):
    from vlrl.data.sources import load_samples
    from vlrl.rollout.embedded import EmbeddedSampler

    config = cfg(tiny_model_dir, tmp_path, "env.environment=envs_for_tests:ImageEveryCall",
                 "rollout.max_new_tokens=48")
    groups = RolloutGroups(config, adapter, EmbeddedSampler(tiny_model, adapter, config.rollout))
    got = groups.score_groups(load_samples(config.env, "train", 0)[:3], 3, 5)
    rollouts = got.rollouts
    assert sum(len(r.env_images) for r in rollouts) >= 3 and max(r.turns for r in rollouts) == 3
    # the environment's own rewards are scored; an episode it gave none to counts 0 (in the total and the
    # metric)
    assert got.per_fn["env"] == [r.rewards["env"]
                                 for r in rollouts] == [r.env_reward or 0.0 for r in rollouts]
    assert any(r.env_reward for r in rollouts)
    batch = adapter.build_batch(rollouts)
    with torch.no_grad():
        lp, _ = batch_logprobs(adapter.policy(tiny_model, 1.0), batch)
    stats = mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)
    assert stats["mismatch_kl"] <= 1e-5 and stats["max_abs_diff"] < 1e-4, stats


# --- training -----------------------------------------------------------------------------------------------
def without_timing(ms):
    return [{k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_s"} for m in ms]


def test_a_multi_turn_run_logs_its_episodes_and_resumes_exactly(tiny_model_dir, tmp_path):
    sets = ("env.environment=envs_for_tests:ImageEveryCall", "env.max_turns=2", "checkpoint.every=2",
            "rollout.max_new_tokens=32")
    straight = train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=whole", "train.steps=3"))
    train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=split", "train.steps=2"))
    resumed = train(tiny_config(tiny_model_dir, tmp_path, *sets, "name=split", "train.steps=3"), resume=True)
    a, b = read_jsonl(straight.run_dir / "metrics.jsonl"), read_jsonl(resumed.run_dir / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)
    assert all({"turns/mean", "turns/max", "tool_calls", "env_images", "finish/length"} <= set(m) for m in a)
    assert sum(m["env_images"] for m in a) > 0 and any(m["turns/max"] == 2
                                                       and m["reward/env/mean"] > 0 for m in a)
    samples = read_jsonl(straight.run_dir / "samples.jsonl")
    multi = [s for s in samples if s.get("turns", 1) > 1]
    assert multi and all((straight.run_dir / p).is_file() for s in multi for p in s["env_images"])
    assert "<tool_response>" in multi[0]["completion"]
    assert "tool images" in (straight.run_dir / "report.html").read_text()


def test_check_batch_renders_a_trajectory_and_counts_turns_and_tool_images(tiny_model_dir):
    sets = ("env.environment=envs_for_tests:ImageEveryCall", "env.max_turns=3", "rollout.max_new_tokens=48")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "COLUMNS": "200"}
    args = [sys.executable, "-m", "vlrl", "check-batch", "configs/tiny-cpu.toml",
            *[f"--set={o}" for o in tiny_overrides(tiny_model_dir, "/tmp", *sets)]]
    res = subprocess.run([*args, "--json"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    report = json.loads(res.stdout)
    assert report["ok"], report["checks"]
    assert report["stats"]["max_turns"] == 3 and report["stats"]["env_images"] > 0
    assert "<tool_response>" in report["sample"]["text"] and report["sample"]["turns"] == 3
    table = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert "(tool image 1)" in table.stdout and "3 turns" in table.stdout and "batch OK" in table.stdout


# --- what an environment returns (issue #30) ----------------------------------------------------------------
def test_an_environment_step_returning_no_reply_makes_a_named_bad_sample(adapter, tmp_path, tiny_model_dir):
    from vlrl.data.sources import load_samples

    config = cfg(tiny_model_dir, tmp_path, "env.environment=envs_for_tests:ReturnsNone")
    got = RolloutGroups(config, adapter, Scripted(adapter, ["red"])).score_groups(
        load_samples(config.env, "train", 0)[:3], 2, 0)
    assert [s.id for s, _ in got.bad_samples] == ["colors-train-1"]
    assert ("the environment failed in step (it returned None, not a vlrl.envs.environment.Reply)"
            in got.bad_samples[0][1])
    assert {r.sample.id for r in got.rollouts} == {"colors-train-0", "colors-train-2"}


def test_an_environment_reward_that_is_not_a_number_fails_like_a_reward_function(
    adapter, tmp_path, tiny_model_dir):
    import math

    from vlrl.data.sources import load_samples

    config = cfg(tiny_model_dir, tmp_path, "env.environment=envs_for_tests:RewardNotANumber")
    got = RolloutGroups(config, adapter, Scripted(adapter, ["red"])).score_groups(
        load_samples(config.env, "train", 0)[:3], 2, 0)
    assert got.bad_samples == [] and len(got.rollouts) == 6
    assert {k: v for k, v in got.failures.items() if v} == {"not_a_number": 2, "nan": 2}
    assert any("on sample colors-train-1: the environment's Reply.reward on turn 1 was 'high' "
               "(not_a_number)" in e
               for e in got.errors)
    failed = [r for r in got.rollouts if r.sample.id != "colors-train-0"]
    assert all(math.isnan(r.reward) and r.rewards["env"] is None and r.advantage == 0.0 for r in failed)
    assert [r.sample.id for r in got.trained] == ["colors-train-0"] * 2  # out of the loss and the baseline
    assert all(r.rewards["env"] == 0.5 for r in got.trained)


class Budgeted(Scripted):
    """Scripted, but each prompt's ids are cut at its budget (rollout.max_new_tokens, or what is left of the
    context on a later turn), as a real sampler cuts them."""

    def __init__(self, adapter, turns, max_new_tokens):
        super().__init__(adapter, turns)
        self.max_new_tokens = max_new_tokens

    def sample(self, prompts, n, seed=None):
        out = super().sample(prompts, n, seed)
        for r in out:
            budget = min(self.max_new_tokens, r.prompt.max_new_tokens or self.max_new_tokens)
            if len(r.completion_ids) > budget:
                r.completion_ids, r.logprobs = r.completion_ids[:budget], r.logprobs[:budget]
                r.finish_reason = "length"
        return out


def test_a_turn_cut_by_the_context_is_a_context_cut_not_a_length_one(adapter, tmp_path, tiny_model_dir):
    from envs_for_tests import TextEveryTurn

    turn = "red " * 10
    said = len(adapter.tokenizer.encode(turn, add_special_tokens=False)) + 1
    config = cfg(tiny_model_dir, tmp_path, "rollout.max_new_tokens=64", "env.max_turns=5",
                 "model.max_model_len=1024")
    whole, _ = episodes(adapter, TextEveryTurn(), Budgeted(adapter, [turn], 64), config, n=1)
    prompt = len(whole[0].prompt.input_ids)
    reply = (len(whole[0].completion_ids) - 5 * said) // 4  # "go on", between turns
    # turn 2 has room for about half its words: the context cuts it, not max_new_tokens
    tight = cfg(tiny_model_dir, tmp_path, "rollout.max_new_tokens=64", "env.max_turns=5",
                f"model.max_model_len={prompt + said + reply + said // 2}")
    rollouts, _ = episodes(adapter, TextEveryTurn(), Budgeted(adapter, [turn], 64), tight, n=1)
    for r in rollouts:
        assert (r.turns, r.finish_reason) == (2, "context")
        assert len(r.prompt.input_ids) + len(r.completion_ids) == tight.model.max_model_len
    first = cfg(tiny_model_dir, tmp_path, "rollout.max_new_tokens=16", f"model.max_model_len={prompt + 5}")
    cut_first, _ = episodes(adapter, TextEveryTurn(), Budgeted(adapter, [turn], 16), first, n=1)
    assert {(r.turns, r.finish_reason, len(r.completion_ids)) for r in cut_first} == {(1, "context", 5)}
    short = cfg(tiny_model_dir, tmp_path, "rollout.max_new_tokens=8", "env.max_turns=5",
                "model.max_model_len=1024")
    cut, _ = episodes(adapter, TextEveryTurn(), Budgeted(adapter, [turn], 8), short, n=1)
    assert {(r.turns, r.finish_reason, len(r.completion_ids)) for r in cut} == {(1, "length", 8)}


def test_at_the_turn_budget_no_tool_runs_and_none_is_counted(adapter, tmp_path, tiny_model_dir):
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "6 * 7"}}</tool_call>'
    config = cfg(tiny_model_dir, tmp_path, "env.max_turns=2", "model.max_model_len=2048")
    rollouts, _ = episodes(adapter, CalculatorEnv(), Scripted(adapter, [call]), config, n=1)
    for r in rollouts:
        assert (r.turns, r.finish_reason, r.tool_calls) == (2, "max_turns", 1)
        assert r.transcript.count("<tool_response>") == 1  # the second call got no reply: the episode ended
    answered, _ = episodes(adapter, CalculatorEnv(), Scripted(adapter, [call, "It is 42."]), config, n=1)
    assert {(r.turns, r.finish_reason, r.tool_calls) for r in answered} == {(2, "stop", 1)}  # still an answer


def test_a_tool_image_of_unusable_shape_is_a_tool_error_the_model_reads(adapter, tmp_path, tiny_model_dir):
    from envs_for_tests import StripImage

    config = cfg(tiny_model_dir, tmp_path, "env.max_turns=2")
    rollouts, bad = episodes(adapter, StripImage(), Scripted(adapter, ["look"]), config)
    assert bad == [] and len(rollouts) == 4
    for r in rollouts:
        # the usable image stays
        assert (r.turns, r.tool_errors, len(r.env_images)) == (2, {"bad_image": 1}, 1)
        assert ("Error: the tool returned an image that cannot be used: 1x4000 cannot be used ("
                in r.transcript)


def test_response_length_counts_sampled_tokens_not_the_environments_replies(
    adapter, tmp_path, tiny_model_dir):

    from vlrl.data.sources import load_samples
    from vlrl.metrics import step_metrics, step_stats

    config = cfg(tiny_model_dir, tmp_path)
    got = RolloutGroups(config, adapter, Scripted(adapter, ["look"])).score_groups(
        load_samples(config.env, "train", 0)[:2], 2, 0)
    said = len(adapter.tokenizer.encode("look", add_special_tokens=False)) + 1
    assert all(len(r.completion_ids) > 3 * said for r in got.rollouts)  # tool replies and images in between
    times = dict.fromkeys(("rollout", "rollout_wait", "update", "sync", "step"), 1.0)
    m = step_metrics(1, step_stats(got), {}, times, 0.0, got.keys[0], False, multi_turn=True)
    assert (m["response_length/mean"], m["response_length/max"]) == (3 * said, 3 * said)
