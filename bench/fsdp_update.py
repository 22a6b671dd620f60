"""Full-parameter Qwen3-VL-8B update steps under FSDP2 on 1, 2, 4 GPUs: tokens/s per GPU, MFU, scaling
efficiency, peak memory per GPU.

    python bench/fsdp_update.py --gpus 1 2 4                 # one `accelerate launch` per GPU count, then the
    table python bench/fsdp_update.py --gpus 1 2 4 --precision bf16 bf16-mixed
    python bench/fsdp_update.py --tiny --gpus 1 2            # tiny model, CPU processes over gloo (a smoke
    test) python bench/fsdp_update.py --ragged --gpus 1 2 4 --strategy fsdp2 ddp --plan packed padded
    --precision bf16

`--ragged`: every rank samples its own ragged GRPO batch (`bench/ragged.py`'s: 8 prompts x groups of 8,
completions log-normal, seeded by rank), and the step is planned as `vlrl train` plans it
(`vlrl.planner.plan_step` with the ranks' reductions): `packed` balances the ranks' rollouts by tokens and
packs micro-batches within 16384 tokens; `padded` keeps each rank's rollouts and pads micro-batches of 8 (in
order). Rows add the useful (non-padding) tokens per GPU, MFU on them, and the ranks' token counts (busiest
over mean). `--strategy ddp` launches Accelerate's DDP (`--multi_gpu`) instead of the FSDP2 config.

Each run is `accelerate launch --config_file configs/accelerate/fsdp2-4gpu.yaml --num_processes N` of this
script's worker, i.e. Accelerate's FSDP2 preparation exactly as `vlrl train` gets it, and vlrl's real update:
`Qwen3VLPolicy` -> `accumulate_gradients` -> gradient clipping -> AdamW step (a full optimizer step, every
language-model parameter trained, the vision tower frozen). Every rank trains its own batch of the same shape
(default 8 x 1041 tokens, one 448x448 image each: the single-GPU baseline's), so the per-GPU work is fixed and
perfect scaling keeps tokens/s per GPU constant: efficiency = (tokens/s per GPU at N) / (tokens/s per GPU at
1).

Precisions: `bf16-mixed` is what the fsdp2-*.yaml configs run (float32 master weights and AdamW state, bf16
compute); `bf16` keeps weights and AdamW state in bf16 (`--mixed_precision no` on a bf16 model), which is what
one-GPU `vlrl train` does, and the only one whose full state fits one 80 GB GPU for 8B.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PEAK_TFLOPS = 989.0


def worker(args) -> None:
    import ragged as ragged_bench
    from accelerate import Accelerator
    from transformers import AutoModelForImageTextToText
    from update_step import (
        IM_END,
        PAD,
        VISION_END,
        VISION_START,
        bench_adapter,
        make_rollouts,
        non_embedding_params,
        qwen3_vl_8b_config,
    )

    from vlrl.adapters.packing import packing_unavailable
    from vlrl.adapters.patches import patch_model
    from vlrl.adapters.qwen3_vl import compile_layers, set_checkpointing
    from vlrl.config import AlgorithmConfig
    from vlrl.fsdp import is_fsdp, prepare_on_cpu
    from vlrl.planner import StepPlan, micro_batch_tokens, plan_step
    from vlrl.update import accumulate_gradients

    acc = Accelerator(cpu=args.tiny)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    torch.manual_seed(0)
    if args.tiny:
        from vlrl.tiny_model import build_tiny_qwen3_vl

        with acc.main_process_first():  # rank 0 builds it, the others load that one
            path = Path(tempfile.gettempdir()) / f"vlrl-bench-tiny-{os.getuid()}"
            if not (path / "config.json").is_file():
                build_tiny_qwen3_vl(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        b, seq, side, completion = 4, 160, 64, 96
    else:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(qwen3_vl_8b_config(), dtype=torch.bfloat16,
                                                            attn_implementation="sdpa")
        b, seq, side, completion = args.batch, args.seq_len, args.image_side, args.completion
    cfg = model.config
    patch_model(model)  # as Qwen3VLAdapter.load_model: shared images, the tower's fast path, packed attention
    unavailable = packing_unavailable(model)
    n_params = non_embedding_params(model)
    model.train()
    model.model.visual.requires_grad_(False)
    set_checkpointing(model, args.checkpoint_fraction)
    if args.compile:
        compile_layers(model)
    vocab = cfg.text_config.vocab_size
    adapter = bench_adapter(cfg.image_token_id, cfg.video_token_id, PAD if vocab > 150000 else 0,
                            IM_END if vocab > 150000 else 1, max_model_len=1 << 20)
    policy = adapter.policy(model, 1.0, fused_head=args.compile)
    if args.tiny and args.strategy == "fsdp2":
        policy = prepare_on_cpu(acc, policy, adapter.fsdp_units)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    else:  # (no reference to the unsharded parameters may outlive prepare: they would stay allocated)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                      lr=1e-6, fused=True)
        policy, optimizer = acc.prepare(policy, optimizer)
    del model
    gc.collect()
    assert is_fsdp(acc) == (args.strategy == "fsdp2") or args.tiny or world == 1, \
        f"not {args.strategy}: {acc.distributed_type}"
    if args.ragged:
        spec = ragged_bench.RaggedSpec.tiny() if args.tiny else ragged_bench.RaggedSpec()
        big = vocab > 150000
        ends = (VISION_START, VISION_END) if big else (adapter.image_token_id - 2, adapter.image_token_id - 1)
        rollouts = ragged_bench.ragged_rollouts(adapter, spec, vocab, *ends, seed=rank)
        train = SimpleNamespace(packing=args.plan == "packed", micro_batch_tokens=spec.micro_batch_tokens,
                                micro_batch_size=spec.micro_batch_size, micro_batch_patches=None)
        reduce = lambda values, op: acc.reduce(  # noqa: E731
            torch.tensor(values, dtype=torch.float64, device=device), op).tolist()
        batch, plan = plan_step(rollouts, [], adapter.build_batch, train, unavailable, world, reduce)
        completion = spec.longest
    else:
        batch = adapter.build_batch(make_rollouts(adapter, b, seq, 1, side, completion, vocab, seed=1 + rank))
        plan = StepPlan([list(range(i, min(i + args.micro_batch, b))) for i in range(0, b, args.micro_batch)],
                        packed=False)
    # behavior logprobs near the policy's own: none masked
    ragged_bench.own_logprobs(policy, batch, plan, device)
    b, lengths = batch.size, batch.lengths
    batch = batch.to(device)
    counts = torch.tensor([batch.num_loss_tokens, float(b)], dtype=torch.float64, device=device)
    counts = acc.reduce(counts, "sum")
    settings = AlgorithmConfig()

    def step():
        accumulate_gradients(policy, batch, plan, settings, completion, device, accelerator=acc,
                             total_tokens=float(counts[0]),
                             total_sequences=float(counts[1]), loss_scale=world)
        acc.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    stats = acc.reduce(torch.tensor([t, peak], dtype=torch.float64, device=device), "max")  # the slowest rank
    tokens = float(sum(lengths))  # useful tokens of this rank
    computed = micro_batch_tokens(lengths, [g for g, _ in plan.passes], plan.packed)
    loads = acc.gather(torch.tensor([tokens], dtype=torch.float64, device=device)).tolist()
    if rank == 0:
        t, peak = stats.tolist()
        tps = sum(loads) / world / t
        row = dict(gpus=world, seconds=t, tokens_per_gpu=tokens, tokens_per_s_per_gpu=tps,
                   mfu=6 * n_params * tps / (PEAK_TFLOPS * 1e12), peak_gib=peak, busiest=max(loads)
                   / (sum(loads) / world),
                   padding=1 - tokens / sum(computed), device=torch.cuda.get_device_name()
                   if device.type == "cuda" else "CPU")
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(row))
    acc.wait_for_everyone()


def launch(n: int, run: dict, args, out: Path) -> dict:
    """One worker run of `run` (precision, strategy, plan) on `n` GPUs (or CPU processes); {"error": ...} when
    it fails (e.g. out of memory)."""
    precision = run["precision"]
    passthrough = ["--worker", "--json", str(out), "--precision", precision, "--strategy", run["strategy"],
                   "--plan", run["plan"], "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--image-side", str(args.image_side), "--completion",
                   str(args.completion), "--micro-batch", str(args.micro_batch), "--checkpoint-fraction",
                   str(args.checkpoint_fraction), "--warmup", str(args.warmup), "--repeat", str(args.repeat)]
    passthrough += ["--tiny"] * args.tiny + ["--compile"] * args.compile + ["--ragged"] * args.ragged
    if args.tiny:
        # (--standalone: a free port, not the fixed 29500 a process just before may still hold)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               *passthrough]
    else:
        how = (["--config_file", str(ROOT / "configs/accelerate/fsdp2-4gpu.yaml")]
               if run["strategy"] == "fsdp2"
               else ["--multi_gpu"] * (n > 1))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(n),
               "--mixed_precision", "bf16" if precision == "bf16-mixed" else "no", __file__, *passthrough]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {args.timeout} s"}
    if res.returncode != 0 or not out.is_file():
        text = res.stderr + res.stdout
        if "OutOfMemoryError" in text or "CUDA out of memory" in text:
            return {"error": "out of memory"}
        errors = [line for line in text.splitlines() if "Error" in line and "ChildFailedError" not in line]
        raised = [line for line in errors if "Error:" in line]  # (an exception's own line, not a path in a trace)
        return {"error": (raised or errors)[-1] if errors else text[-1500:]}
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--precision", nargs="+", default=["bf16-mixed"], choices=["bf16-mixed", "bf16"])
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU processes (gloo)")
    ap.add_argument("--batch", type=int, default=8, help="samples per GPU")
    ap.add_argument("--seq-len", type=int, default=1041)
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--completion", type=int, default=768)
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward pass")
    ap.add_argument("--checkpoint-fraction", type=float, default=1.0)
    ap.add_argument("--compile", action="store_true", help="compiled decoder layers and fused logprob head")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--strategy", nargs="+", default=["fsdp2"], choices=["fsdp2", "ddp"])
    ap.add_argument("--ragged", action="store_true",
                    help="bench/ragged.py's ragged GRPO batch per GPU, planned as vlrl train plans")
    ap.add_argument("--plan", nargs="+", default=["padded"], choices=["packed", "padded"],
                    help="with --ragged: packed (token-balanced ranks) or padded micro-batches")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.precision, args.strategy, args.plan = args.precision[0], args.strategy[0], args.plan[0]
        return worker(args)

    runs = [dict(strategy=st, plan=pl, precision=pr) for st in args.strategy for pl in args.plan
            for pr in args.precision]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            label = ", ".join(run[k] for k in ("strategy", "precision") + ("plan",) * args.ragged)
            for n in args.gpus:
                row = launch(n, run, args, Path(tmp) / f"{label}-{n}.json".replace(", ", "-"))
                row.update(gpus=n, label=label)
                rows.append(row)
                print(f"  {label}, {n} GPU(s): " + (row["error"][:300] if "error" in row else
                      f"{row['seconds']:.3f} s/step, {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
                      f"MFU {row['mfu']:.1%}, peak {row['peak_gib']:.1f} GiB"), flush=True)
    what = "tiny model, CPU" if args.tiny else (
        "Qwen3-VL-8B, bench/ragged.py's batch per GPU (useful tokens counted)" if args.ragged
        else f"Qwen3-VL-8B, {args.batch} x {args.seq_len} tokens per GPU")
    print(f"\n{what}; full optimizer step; efficiency against the fewest GPUs of the same row")
    print("| run | GPUs | s/step | tokens/s/GPU | MFU | peak GiB/GPU | busiest rank/mean | padding | scaling "
          "efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in dict.fromkeys(r["label"] for r in rows):
        ok = [r for r in rows if r["label"] == label and "error" not in r]
        base = ok[0] if ok else None
        for r in (r for r in rows if r["label"] == label):
            if "error" in r:
                print(f"| {label} | {r['gpus']} | {r['error'][:40]} | - | - | - | - | - | - |")
                continue
            eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
            print(f"| {label} | {r['gpus']} | {r['seconds']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                  f"{r['mfu']:.1%} | "
                  f"{r['peak_gib']:.1f} | {r['busiest']:.3f} | {r['padding']:.1%} | {eff:.2f} (vs "
                  f"{base['gpus']} GPU) |")


if __name__ == "__main__":
    main()
