"""The in-process (embedded) sampler: generated tokens/s at batch 8 and 64, 128 new tokens, one image each.

It is the sampler when no vLLM server is available. Compares transformers' default dynamic KV cache with a
static cache (which transformers compiles for the decoding step on CUDA), on the same prompts, one process.

    python bench/sampler.py            # GPU: Qwen3-VL-8B architecture, random bf16 weights
    python bench/sampler.py --tiny     # CPU: the tiny model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from update_step import PAD, bench_adapter, make_rollouts, qwen3_vl_8b_config, sync  # noqa: E402

from vlrl.config import RolloutConfig  # noqa: E402
from vlrl.rollout.embedded import EmbeddedSampler  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, nargs="*", default=[1, 8],
                    help="samples per prompt (batch = prompts x this)")
    args = ap.parse_args()
    from transformers import AutoModelForImageTextToText

    if args.tiny:
        import tempfile

        from vlrl.tiny_model import build_tiny_qwen3_vl

        device = torch.device("cpu")
        model = AutoModelForImageTextToText.from_pretrained(
            build_tiny_qwen3_vl(Path(tempfile.mkdtemp()) / "t"))
        seq, side = 60, 64
    else:
        device = torch.device("cuda")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(qwen3_vl_8b_config(), dtype=torch.bfloat16)
        seq, side = 273, 448
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    adapter = bench_adapter(cfg.image_token_id, cfg.video_token_id, PAD if vocab > 150000 else 0,
                            cfg.text_config.vocab_size - 5, max_model_len=1 << 20)
    prompts = [r.prompt for r in make_rollouts(adapter, args.prompts, seq + 1, 1, side, 1, vocab)]
    model.eval()
    rows = []
    for cache in ("dynamic", "static"):
        sampler = EmbeddedSampler(model, adapter, RolloutConfig(max_new_tokens=args.new_tokens),
                                  static_cache=cache == "static")
        for n in args.samples:
            sampler.sample(prompts, n, seed=0)  # warm-up (and, for the static cache, compilation)
            sync(device)
            t0 = time.perf_counter()
            out = sampler.sample(prompts, n, seed=1)
            sync(device)
            dt = time.perf_counter() - t0
            tokens = sum(len(r.completion_ids) for r in out)
            rows.append((cache, len(prompts) * n, dt, tokens / dt))
            print(f"  {cache} cache, batch {len(prompts) * n}: {dt:.2f} s, {tokens / dt:,.0f} generated "
                  "tokens/s",
                  flush=True)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{dev}, {args.new_tokens} new tokens per sample, {seq}-token prompts with one {side}px image")
    print("| KV cache | batch | s | generated tokens/s |\n|---|---|---|---|")
    for cache, b, dt, tps in rows:
        print(f"| {cache} | {b} | {dt:.2f} | {tps:,.0f} |")
    base = {b: tps for cache, b, _, tps in rows if cache == "dynamic"}
    print("static/dynamic: "
          + ", ".join(f"batch {b} {tps / base[b]:.2f}x" for c, b, _, tps in rows if c == "static"))


if __name__ == "__main__":
    main()
