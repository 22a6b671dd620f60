"""A second real vLLM server, serving a tiny model with tied embeddings (as Qwen3-VL-2B/4B): the disk weight
sync keeps its output head in step with the trainer; `vlrl serve` stops its whole server on SIGTERM, started
or starting (SIGHUP: tests/test_server_faults.py, at the end of the restarted server)."""

from __future__ import annotations

import copy
import signal

import pytest
import torch
from safetensors import safe_open

from vlrl.adapters.qwen3_vl import Qwen3VLAdapter
from vlrl.config import ModelConfig
from vlrl.rollout import weight_sync
from vlrl.rollout.vllm_client import VLLMClient, VLLMSampler
from vlrl.rollout.weight_sync import DiskWeightSync

from vllm_server import Server, live_processes_in_group, prompts, rollout_cfg, trainer_logprobs

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    from vlrl.tiny_model import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tied") / "tiny-tied", tied=True)


@pytest.fixture(scope="module")
def tied_server(tied_dir, tmp_path_factory):
    srv = Server(tied_dir, tmp_path_factory.mktemp("vllm-tied") / "serve.log").start()
    yield srv
    srv.assert_stops(signal.SIGTERM, 143)  # what a scheduler sends on preemption


@pytest.fixture(scope="module")
def tied(tied_dir):
    adapter = Qwen3VLAdapter.from_config(ModelConfig(path=str(tied_dir), dtype="float32", min_pixels=4096,
                                                     max_pixels=16384, max_model_len=1024))
    model = adapter.load_model(torch.float32).eval()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return adapter, model


def test_the_sync_writes_a_tied_head_as_its_own_tensor(tied, tiny_model, tmp_path):
    adapter, model = tied
    adapter.save_pretrained(model, tmp_path / "t")
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers writes the shared matrix once
    plan = weight_sync.export_plan(model)
    assert plan["lm_head.weight"] and plan["model.language_model.embed_tokens.weight"]  # the sync writes both
    head = dict(weight_sync.export_tensors(model, None, ["lm_head.weight"]))["lm_head.weight"]
    assert head is model.lm_head.weight
    frozen = copy.deepcopy(model)
    # a frozen embedding: the head is frozen too
    frozen.model.language_model.embed_tokens.requires_grad_(False)
    assert not weight_sync.export_plan(frozen)["lm_head.weight"]
    assert ("lm_head.weight" in weight_sync.export_plan(tiny_model)
            and not tiny_model.config.tie_word_embeddings)


def test_disk_sync_keeps_a_tied_head_in_step(tied_server, tied, tmp_path, monkeypatch):
    """The trainer changes every language-model weight (the shared embedding/head included) and syncs: the
    server then samples with exactly the trainer's weights. Without the head's own file, vLLM 0.32 keeps the
    old head's packed weights and the two drift apart."""
    adapter, model = tied
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "language_model" in name:
                p.add_(0.05 * torch.randn_like(p))
    assert new.lm_head.weight is new.model.language_model.embed_tokens.weight
    sync = DiskWeightSync(VLLMClient(tied_server.url, rollout_cfg(tied_server)), adapter,
                          tmp_path / "weights")
    sampler = VLLMSampler(adapter, rollout_cfg(tied_server), weight_sync=sync)
    plan = weight_sync.export_plan
    with monkeypatch.context() as m:  # the sync as it was: the shared matrix once, as the embedding
        m.setattr(weight_sync, "export_plan", lambda
                  *a: {k: v for k, v in plan(*a).items() if k != "lm_head.weight"})
        sampler.sync_weights(new)
        stale = trainer_logprobs(adapter, new, sampler.sample(prompts(adapter), n=4))
    assert stale["mismatch_kl"] > 1e-3, stale
    sampler.sync_weights(new)
    fixed = trainer_logprobs(adapter, new, sampler.sample(prompts(adapter), n=4))
    assert fixed["mismatch_kl"] <= 1e-5 and fixed["max_abs_diff"] < 1e-4, fixed
    rollouts = sampler.sample(prompts(adapter), n=4)
    assert trainer_logprobs(adapter, model, rollouts)["max_abs_diff"] > 1e-2  # the server did move


def test_sigterm_while_the_server_starts_stops_it(tiny_model_dir, tmp_path):
    """Preempted during the long start-up (minutes for an 8B model): the half-started server goes too."""
    import time

    srv = Server(tiny_model_dir, tmp_path / "serve.log").launch()
    deadline = time.time() + 240  # a loaded 2-core machine takes a minute or more to get there
    while time.time() < deadline and "Starting to load model" not in srv.log_text():
        time.sleep(0.2)
    assert "Starting to load model" in srv.log_text() and "vLLM ready" not in srv.out.read_text()
    assert len(live_processes_in_group(srv.vllm_pid())) >= 3  # the API server, its engine core, a worker
    srv.assert_stops(signal.SIGTERM, 143)


def test_judge_with_a_real_vllm_server(tied_server):
    """The tiny model as judge: its free text holds no verdict (a counted `unparseable` failure, not a crash);
    constrained by vLLM's structured outputs to `Score: N`, every judgement parses into N / 9."""
    from vlrl.config import JudgeConfig, RewardSpec
    from vlrl.rewards.reward_set import RewardSet
    from vlrl.sample import Sample

    samples = [Sample(id=str(i), question="What is 2 + 2?", answer="4") for i in range(4)]
    completions = ["<think>easy</think> 4", "5", "four", "I do not know"]
    judge = {"base_url": f"{tied_server.url}/v1", "max_tokens": 8, "timeout_s": 60}
    free = RewardSet([RewardSpec(fn="judge", judge=JudgeConfig(**judge, score_pattern=r"VERDICT=(\d)"))], 5.0)
    res = free.score(completions, samples)
    assert res.total == [None] * 4 and res.failures["unparseable"] == 4 and res.failures["judge_failed"] == 0
    assert res.errors[0].startswith("reward judge on sample 0: the judge's reply has no score matching")
    forced = JudgeConfig(**judge, max_score=9, extra_body={"structured_outputs": {"regex": "Score: [0-9]"}})
    res = RewardSet([RewardSpec(fn="judge", judge=forced)], 5.0).score(completions, samples)
    assert res.errors == [] and all(v in [k / 9 for k in range(10)] for v in res.per_fn["judge"]), res.per_fn
