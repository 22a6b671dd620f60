"""One MoE layer's experts, forward + backward: vlrl's (`adapters/moe_experts.py`) against transformers'
`grouped_mm` and, optionally, its eager loop, on Qwen3-VL-30B-A3B's shapes (128 experts, top-8, hidden 2048,
expert width 768), random routing weights, bfloat16 on the GPU (float32 on the CPU with `--tiny`).

    python bench/moe_experts.py                 # GPU: a table, the top CUDA kernels of each path, a ratio
    python bench/moe_experts.py --tiny          # CPU smoke test (small shapes)

Last line: `moe experts: vlrl vs grouped_mm X.XXx (forward + backward), max |out diff| D`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlrl.adapters import moe_experts  # noqa: E402


def build(args, device, dtype):
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    moe_experts.register()
    cfg = Qwen3VLMoeTextConfig(hidden_size=args.hidden, moe_intermediate_size=args.width,
                               num_experts=args.experts, num_experts_per_tok=args.top_k)
    experts = Qwen3VLMoeTextExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=g)
    logits = torch.randn(args.tokens, args.experts, device=device, generator=g)
    w, idx = torch.topk(torch.softmax(logits, -1), args.top_k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)
    return experts, x, idx, w


def step(experts, x, idx, w, implementation, grad):
    experts.config._experts_implementation = implementation
    xs = x.detach().requires_grad_()
    ws = w.detach().requires_grad_()
    out = experts(xs, idx, ws)
    out.backward(grad)
    return out.detach(), xs.grad, ws.grad


def timed(fn, device, repeat):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def kernels(fn, rows=8):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", type=int, default=8328, help="8 x 1041, the update bench's batch")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="also transformers' loop over experts")
    ap.add_argument("--profile", action="store_true", help="the top CUDA kernels of each path")
    args = ap.parse_args()
    if args.tiny:
        args.tokens, args.hidden, args.width, args.experts, args.top_k, args.repeat = 256, 64, 32, 8, 2, 3
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    experts, x, idx, w = build(args, device, dtype)
    grad = torch.randn_like(x)
    paths = ["grouped_mm", "vlrl"] + (["eager"] if args.eager else [])
    outs = {p: step(experts, x, idx, w, p, grad) for p in paths}
    ref = outs["grouped_mm"]
    print(f"{device.type}, {dtype}, {args.tokens} tokens, {args.experts} experts, top-{args.top_k}, hidden "
          f"{args.hidden}, width {args.width}\n")
    print("| path | ms (forward + backward) | vs grouped_mm | max |out diff| | max |dx diff| "
          "| max |dw diff| |")
    print("|---|---|---|---|---|---|")
    times = {}
    for p in paths:
        times[p] = timed(lambda p=p: step(experts, x, idx, w, p, grad), device, args.repeat)
        o, dx, dw = outs[p]
        diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip((o, dx, dw), ref)]
        print(f"| {p} | {times[p] * 1e3:.2f} | {times['grouped_mm'] / times[p]:.2f}x | "
              + " | ".join(f"{d:.1e}" for d in diffs) + " |")
    if args.profile and device.type == "cuda":
        for p in paths[:2]:
            print(f"\n{p}:")
            kernels(lambda p=p: step(experts, x, idx, w, p, grad))
    diff = float((outs["vlrl"][0].float() - ref[0].float()).abs().max())
    print(f"moe experts: vlrl vs grouped_mm {times['grouped_mm'] / times['vlrl']:.2f}x (forward + backward), "
          f"max |out diff| {diff:.1e}")


if __name__ == "__main__":
    main()
