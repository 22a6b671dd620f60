"""The mixture-of-experts Qwen3-VL (`qwen3_vl_moe`) behind the adapter: grouped experts, packing, routing
replay (recorded by the embedded sampler, read from vLLM's answer), the router's load-balancing loss."""

import base64
import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl.batch import batch_logprobs
from vlrl.config import AlgorithmConfig, ModelConfig, RolloutConfig
from vlrl.planner import StepPlan
from vlrl.records import EncodedPrompt, Rollout
from vlrl.rollout.embedded import EmbeddedSampler
from vlrl.update import accumulate_gradients


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    env = os.environ.get("VLRL_TINY_MOE_MODEL")
    if env and (Path(env) / "config.json").is_file():
        return Path(env).resolve()
    from vlrl.adapters import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-vl-moe", "qwen3-vl-moe")


@pytest.fixture(scope="module")
def moe_adapter(moe_dir):
    from vlrl.adapters import load_adapter

    return load_adapter(ModelConfig(path=str(moe_dir), dtype="float32", min_pixels=64 * 64,
                                    max_pixels=128 * 128, max_model_len=1024))


@pytest.fixture(scope="module")
def moe_model(moe_adapter):
    return moe_adapter.load_model(torch.float32).eval()


def prompts(adapter, n: int = 3) -> list[EncodedPrompt]:
    out = []
    for i in range(n):
        imgs = [Image.new("RGB", (64 + 32 * (i % 2), 64), (60 * i, 200, 30))] * (i % 2)
        out.append(adapter.encode_prompt(adapter.build_messages(f"What color {i}?" + " more" * i, len(imgs)),
                                         imgs))
    return out


@pytest.fixture(scope="module")
def sampled(moe_adapter, moe_model):
    """Rollouts of the embedded sampler (routing recorded), with advantages, and their batch."""
    sampler = EmbeddedSampler(moe_model, moe_adapter, RolloutConfig(max_new_tokens=12, group_size=2))
    rollouts = sampler.sample(prompts(moe_adapter), 2, seed=0)
    for k, r in enumerate(rollouts):
        r.advantage = (-1.0) ** k * (0.5 + 0.1 * k)
    return rollouts, moe_adapter.build_batch(rollouts)


def test_the_family_comes_from_the_config_and_experts_are_grouped(moe_adapter, moe_model):
    from vlrl.adapters.qwen3_vl_moe import Qwen3VLMoeAdapter

    assert isinstance(moe_adapter, Qwen3VLMoeAdapter)
    assert moe_model.config.text_config._experts_implementation == "grouped_mm"
    names = {type(m).__name__ for m in moe_model.modules()}
    assert set(moe_adapter.fsdp_units) <= names  # the FSDP2 units exist under these names
    text = moe_model.config.text_config
    assert (text.num_experts, text.num_experts_per_tok) == (4, 2)


def eager_double(model):
    """A float64 copy with transformers' loop over experts: torch 2.14's CPU `grouped_mm` takes float32,
    bfloat16 and float16 only ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double") and
    transformers 5.19 does not fall back for float64."""
    out = copy.deepcopy(model).double()
    out.config.text_config._experts_implementation = "eager"
    return out


def test_grouped_and_eager_experts_give_the_same_logprobs(moe_adapter, moe_model, sampled):
    """grouped_mm (CPU: torch's grouped_mm kernel) against transformers' loop over experts (float64)."""
    _, batch = sampled
    with torch.no_grad():
        a, _ = batch_logprobs(moe_adapter.policy(moe_model, 1.0), batch)
        b, _ = batch_logprobs(moe_adapter.policy(eager_double(moe_model), 1.0), batch)
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b.float(), atol=2e-6, rtol=1e-6)


def test_the_embedded_sampler_records_each_tokens_experts(sampled, moe_model):
    rollouts, batch = sampled
    layers, k = moe_model.config.text_config.num_hidden_layers, 2
    for r in rollouts:
        n = len(r.prompt.input_ids) + len(r.completion_ids)
        assert r.routed_experts.shape == (n - 1, layers, k)
        e = r.routed_experts
        assert int(e.min()) >= 0 and int(e.max()) < 4 and bool((e[..., 0] != e[..., 1]).all())
    routed = batch.model_inputs["routed_experts"]
    assert routed.shape == (*batch.input_ids.shape, layers, k) and batch.layout["routed_experts"] == "token"


def test_replay_forces_the_samplers_experts(moe_adapter, moe_model, sampled):
    """With the sampler's own routing the trainer's logprobs are the sampler's (float32, 1e-5 as for the dense
    model); with other experts forced they move, and a record of only -1 (no record) is the router's own
    choice exactly."""
    rollouts, batch = sampled
    policy = moe_adapter.policy(moe_model, 1.0)
    mask = batch.loss_mask.bool()
    with torch.no_grad():
        replayed, _ = batch_logprobs(policy, batch)
        torch.testing.assert_close(replayed[mask], batch.behavior_logprobs[mask], atol=1e-5, rtol=1e-5)
        other = copy.deepcopy(batch)
        other.model_inputs["routed_experts"] = (other.model_inputs["routed_experts"] + 1) % 4
        moved, _ = batch_logprobs(policy, other)
        assert (moved - replayed)[mask].abs().max() > 1e-3
        none = copy.deepcopy(batch)
        none.model_inputs["routed_experts"].fill_(-1)
        own, _ = batch_logprobs(policy, none)
        policy.routing_replay = False
        off, _ = batch_logprobs(policy, other)  # replay off: the record is ignored
    assert torch.equal(own, off)


def test_replay_keeps_a_bf16_samplers_routing(moe_adapter, moe_model):
    """A sampler in bfloat16 (as a vLLM server serves) routes some tokens elsewhere than the float32 trainer;
    with replay the trainer uses the sampler's choice, and the mismatch KL falls (here 2.7e-6 -> 1.3e-6: the
    rest is bf16's own rounding of the logits)."""
    from vlrl.check_batch import mismatch_stats

    sampler_model = copy.deepcopy(moe_model).to(torch.bfloat16)
    sampler = EmbeddedSampler(sampler_model, moe_adapter, RolloutConfig(max_new_tokens=24, group_size=4))
    rollouts = sampler.sample(prompts(moe_adapter, 4), 4, seed=1)
    batch = moe_adapter.build_batch(rollouts)
    policy = moe_adapter.policy(moe_model, 1.0)
    kl = {}
    with torch.no_grad():
        for replay in (True, False):
            policy.routing_replay = replay
            lp, _ = batch_logprobs(policy, batch)
            kl[replay] = mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)["mismatch_kl"]
    print(f"bf16 sampler, float32 trainer: mismatch KL {kl[False]:.2e} without replay, {kl[True]:.2e} with")
    assert kl[True] < kl[False]


SPLITS = {1: [[0, 1, 2, 3, 4, 5]], 2: [[0, 2, 4], [1, 3, 5]], 3: [[5, 0], [3, 2], [1, 4]]}


def grads(policy, batch, plan, settings):
    policy.zero_grad(set_to_none=True)
    stats = accumulate_gradients(policy, batch, plan, settings, 16)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, stats


def relative_errors(got: dict, want: dict) -> dict:
    assert set(got) == set(want)
    return {k: float((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-30)) for k in want}


def test_packed_equals_padded_in_float64_with_replay(moe_adapter, moe_model, sampled):
    """Packed micro-batches (the routed experts packed like the tokens) give the padded whole batch's
    gradient, every parameter (routers and experts included), for 1, 2 and 3 micro-batches."""
    _, batch = sampled
    model = eager_double(moe_model).train()
    policy = moe_adapter.policy(model, 1.0)
    settings = AlgorithmConfig(entropy_coef=0.01)
    want, s0 = grads(policy, batch, [list(range(batch.size))], settings)
    assert any(".experts." in n for n in want) and any("mlp.gate" in n for n in want)
    assert s0["routing_replayed_tokens"] == sum(n - 1 for n in batch.lengths)
    for n, groups in SPLITS.items():
        got, s = grads(policy, batch, StepPlan(groups, packed=True), settings)
        assert s["loss"] == pytest.approx(s0["loss"], rel=1e-12)
        errs = relative_errors(got, want)
        worst = max(errs, key=errs.get)
        # float64 rounding: worst 1.2e-11 (a vision block's qkv, gradient norm 0.017, 2 micro-batches); a
        # token routed to other experts or attending across samples moves gradients by 1e-3 or more
        assert errs[worst] < 1e-10, (n, worst, errs[worst])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vlrl_experts_give_transformers_logprobs_and_gradients(moe_adapter, moe_model, sampled, dtype):
    """moe_experts.py (`experts_implementation = "vlrl"`) against transformers' experts: its loop over
    experts in float64 (to rounding), its grouped_mm in float32 (to float32 noise); logprobs and every
    parameter's gradient (experts, routers through the routing weights, attention, vision)."""
    _, batch = sampled
    if dtype == "float64":
        ref = eager_double(moe_model).train()
    else:
        ref = copy.deepcopy(moe_model).train()
        ref.config.text_config._experts_implementation = "grouped_mm"
    ours = copy.deepcopy(ref)
    ours.config.text_config._experts_implementation = "vlrl"
    settings, plan = AlgorithmConfig(entropy_coef=0.01), [list(range(batch.size))]
    want, s0 = grads(moe_adapter.policy(ref, 1.0), batch, plan, settings)
    got, s1 = grads(moe_adapter.policy(ours, 1.0), batch, plan, settings)
    assert any(".experts." in n for n in want) and any("mlp.gate" in n for n in want)
    errs = relative_errors(got, want)
    worst = max(errs, key=errs.get)
    assert errs[worst] < (1e-12 if dtype == "float64" else 1e-5), (worst, errs[worst])
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-12 if dtype == "float64" else 1e-6)
    with torch.no_grad():
        a, _ = batch_logprobs(moe_adapter.policy(ours, 1.0), batch)
        b, _ = batch_logprobs(moe_adapter.policy(ref, 1.0), batch)
    torch.testing.assert_close(a, b, atol=1e-12 if dtype == "float64" else 2e-6, rtol=0)


def test_router_aux_loss_is_off_by_default_and_trains_the_router_when_on(moe_adapter, moe_model, sampled):
    _, batch = sampled
    policy = moe_adapter.policy(eager_double(moe_model).train(), 1.0)
    plan = [list(range(batch.size))]
    off, s_off = grads(policy, batch, plan, AlgorithmConfig())
    assert "router_aux_loss" not in s_off
    on, s_on = grads(policy, batch, plan, AlgorithmConfig(router_aux_loss_coef=0.5))
    # transformers' E * sum_e f_e P_e with f_e the share of top-k slots per token (summing to k): k = 2 for a
    # perfectly balanced router, E = 4 at worst; a random router is nearly balanced
    assert 1.9 < s_on["router_aux_loss"] < 2.2
    gate = "model.model.language_model.layers.0.mlp.gate.weight"
    assert (on[gate] - off[gate]).abs().max() > 1e-6
    q = "model.model.language_model.layers.0.self_attn.q_proj.weight"
    assert (on[q] - off[q]).abs().max() > 0  # (it also flows back through the hidden states)


def test_multi_turn_episodes_keep_every_turns_routing():
    """Each turn's sampled tokens keep the routing of the turn that sampled them; the rows after them come
    from the next turn's answer (its prefill of the last token and the environment's reply)."""
    from vlrl.rollout.episodes import _Episode

    prompt = EncodedPrompt(input_ids=[1, 2, 3], messages=[], images=[])
    ep = _Episode(group=0, sample=None, state=None, prompt=prompt)
    turn1 = torch.full((3 + 2 - 1, 1, 2), 1, dtype=torch.int16)
    ep.add_turn(Rollout(prompt=prompt, completion_ids=[7, 8], logprobs=[0.0, 0.0], finish_reason="stop",
                        routed_experts=turn1))

    class Reply:
        input_ids, image_grid_thw = [9, 9], None

    ep.add_reply(Reply())
    turn2 = torch.full((7 + 3 - 1, 1, 2), 2, dtype=torch.int16)
    ep.add_turn(Rollout(prompt=ep.continuation(100), completion_ids=[5, 6, 4], logprobs=[0.0] * 3,
                        finish_reason="stop", routed_experts=turn2))
    r = ep.rollout(_Tok(), 99)
    assert r.routed_experts[:, 0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2]


class _Tok:
    def decode(self, ids, **kw):
        return ""


def test_vllm_routed_experts_are_read_from_the_answer(moe_adapter):
    """vLLM 0.32's encoding (its own `numpy2base64` of the [tokens - 1, layers, k] uint8 array)."""
    from vllm.utils.serial_utils import numpy2base64

    from vlrl.rollout.vllm_client import ServerError, routed_experts

    rows = np.arange(9 * 2 * 2, dtype=np.uint8).reshape(9, 2, 2) % 4
    choice = {"routed_experts": numpy2base64(rows)}
    got = routed_experts(choice, 10, "prompt 0")
    assert got.dtype == torch.int16 and got.tolist() == rows.tolist()
    assert routed_experts({}, 10, "prompt 0") is None
    with pytest.raises(ServerError, match="for 11 tokens"):
        routed_experts(choice, 11, "prompt 0")
    assert base64.b64decode(choice["routed_experts"])[:6] == b"\x93NUMPY"  # (a .npy, not pickled)
    assert io  # noqa


def test_serve_asks_for_routed_experts_of_moe_models_on_gpus(moe_dir, tiny_model_dir):
    from vlrl.serve import build_command, routes_experts, server_env

    assert routes_experts(str(moe_dir)) and not routes_experts(str(tiny_model_dir))
    cmd = build_command(str(moe_dir), routed_experts=True)
    assert "--enable-return-routed-experts" in cmd and "--enable-prefix-caching" in cmd
    assert server_env(False, routed_experts=True)["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert "--enable-return-routed-experts" not in build_command(str(moe_dir))


@pytest.mark.slow
def test_a_training_run_replays_routing_and_saves_the_checkpoint_layout(moe_dir, tmp_path):
    """`vlrl train` on the tiny MoE (embedded sampler, LoRA on attention): every step replays the recorded
    routing, logs the router's loss when asked, and the checkpoint holds the merged weights with the experts
    in the layout vLLM and transformers read, and the adapter to resume from."""
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    from conftest import tiny_overrides

    sets = tiny_overrides(moe_dir, tmp_path, "train.steps=2", "checkpoint.every=2",
                          "algorithm.router_aux_loss_coef=0.01", "model.lora_rank=4")  # (LoRA on attention)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "vlrl", "train", "configs/tiny-cpu.toml",
                          *[a for s in sets for a in ("--set", s)]], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root / "tests")})
    assert res.returncode == 0, res.stderr[-3000:]
    run = next(p for p in tmp_path.iterdir() if (p / "metrics.jsonl").is_file())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["routing_replayed"] > 0.9 and m["mismatch_kl"] < 1e-9 for m in steps)
    assert all(1.9 < m["router_aux_loss"] < 4.0 for m in steps)
    f = safe_open(str(run / "step-2" / "model.safetensors"), "pt")
    shape = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
    assert shape == [4, 128, 64]  # [E, H, 2I] on disk ([E, 2I, H] in memory)
    assert (run / "step-2" / "adapter" / "adapter_model.safetensors").is_file()  # (to resume from)
    assert not any("lora_" in k for k in f.keys())  # merged


@pytest.mark.slow
def test_fsdp2_shards_the_moe_layers_though_the_launch_config_names_the_dense_ones(moe_dir, tmp_path):
    """`vlrl train` under FSDP2 on 2 CPU ranks with the fsdp2-*.yaml units (the dense model's class names, as
    `tests/fsdp_train_worker.py` sets them): the MoE adapter's units are sharded instead (Accelerate would
    raise "Could not find the transformer layer class Qwen3VLTextDecoderLayer"), the run trains, replays the
    embedded sampler's routing and writes a gathered checkpoint in the checkpoint layout."""
    import json

    from safetensors import safe_open
    from test_distributed import torchrun, train_args

    res = torchrun(2, *train_args("tests/fsdp_train_worker.py", moe_dir, tmp_path, "train.steps=2",
                                  "checkpoint.every=2", "name=moe"))
    assert res.returncode == 0, res.stderr[-4000:]
    steps = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    # (rank 0's view: a step whose groups on rank 0 all have equal rewards trains nothing there)
    assert len(steps) == 2 and any(m["routing_replayed"] > 0.9 and m["grad_norm"] > 0 for m in steps), [
        (m.get("routing_replayed"), m["grad_norm"]) for m in steps]
    f = safe_open(str(tmp_path / "moe" / "step-2" / "model.safetensors"), "pt")
    assert f.get_slice("model.language_model.layers.1.mlp.experts.down_proj").get_shape() == [4, 32, 128]


def test_the_experts_bench_runs_on_the_cpu():
    """`bench/moe_experts.py --tiny` (its GPU run: bench/README.md): every path gives a row, vlrl's experts
    agree with transformers' grouped_mm, and the last line says by how much it is faster."""
    import re
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "bench/moe_experts.py", "--tiny", "--eager"], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|")[1].strip() for line in res.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["grouped_mm", "vlrl", "eager"], rows
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"moe experts: vlrl vs grouped_mm ([\d.]+)x \(forward \+ backward\), "
                     r"max \|out diff\| (\S+)", last)
    assert m and float(m.group(2)) < 1e-5, last
