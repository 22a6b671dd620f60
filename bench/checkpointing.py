"""`train.checkpoint_fraction = "auto"` against fixed fractions: the update with its AdamW step, one process.

Called by `bench/update_step.py --auto` (with `--optimizer` and `--memory-cap GIB`, standing in for a smaller
card on a larger one). For the equal-length case (8 x 1041 tokens by default), compiled layers: each fixed
fraction (1, 0.75, 0.5, 0.25, 0) is timed, then `auto` decides as `vlrl train` does at its first update (three
probe passes on the micro-batch, the optimizer's state still to come) and is timed at what it chose. Each row:
seconds per step (update + optimizer step), MFU (6N per token), peak GiB, or OOM. Auto runs first, before the
fixed fractions fragment the allocator.
"""

from __future__ import annotations

import gc

import torch

from vlrl.activation_memory import AutoCheckpointing
from vlrl.adapters.qwen3_vl import set_checkpointing
from vlrl.update import accumulate_gradients

FIXED = (1.0, 0.75, 0.5, 0.25, 0.0)


def run(model, adapter, policy, device, args, settings, rollouts, tools) -> dict:
    """`tools`: the bench's helpers (timed, set_trainable, non_embedding_params, peak TFLOP/s)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = min(1.0, args.memory_cap * 2**30 / total) if args.memory_cap else 1.0
    torch.cuda.set_per_process_memory_fraction(cap, index)
    batch = adapter.build_batch(rollouts).to(device)
    tools.set_trainable(model, vision=False, checkpointing=True, fraction=1.0)
    with torch.no_grad():
        own, _ = policy(batch.input_ids, batch.attention_mask, batch.loss_mask, **batch.model_inputs)
    batch.behavior_logprobs = (own + 0.05 * torch.randn_like(own)) * batch.loss_mask
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = int(batch.attention_mask.sum())
    flops = 6 * tools.non_embedding_params(model) * tokens
    whole = [list(range(batch.size))]

    def update():
        accumulate_gradients(policy, batch, whole, settings, args.completion, device)

    def timed_row(label: str, fraction: float) -> dict:
        gc.collect()
        torch.cuda.empty_cache()
        opt = torch.optim.AdamW(params, lr=1e-7, fused=True) if args.optimizer else None

        def step():
            update()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)

        try:
            torch.cuda.reset_peak_memory_stats(device)
            seconds = tools.timed(step, device, args.warmup, args.repeat)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            row = {"path": label, "fraction": fraction, "seconds": seconds,
                   "mfu": flops / seconds / (tools.peak_tflops * 1e12), "peak_gib": peak}
        except torch.OutOfMemoryError:
            row = {"path": label, "fraction": fraction, "seconds": None}
        model.zero_grad(set_to_none=True)
        return row  # (the optimizer and its state go with this call's frame)

    auto = AutoCheckpointing(lambda f: set_checkpointing(model, f),
                             len(model.model.language_model.layers), device)

    def probe():
        update()
        model.zero_grad(set_to_none=True)

    said = auto.decide(probe, params, optimizer_has_state=not args.optimizer, agree=lambda values, op: values)
    rows = [timed_row(f"auto ({auto.fraction:.0%} recomputed)", auto.fraction)]
    for f in FIXED:
        set_checkpointing(model, f)
        rows.append(timed_row(f"fixed: {f:.0%} of layers recomputed", f))
    return {"said": said, "rows": rows, "cap_gib": args.memory_cap, "optimizer": args.optimizer,
            "tokens": tokens,
            "predicted_gib": auto.choice.predicted_peak / 2**30 if auto.choice else None}


def print_table(result: dict) -> None:
    cap = f"capped at {result['cap_gib']:g} GiB" if result["cap_gib"] else "the whole card"
    opt = "with the AdamW step" if result["optimizer"] else "without an optimizer step"
    print(f"\nactivation checkpointing, {result['tokens']:,} tokens, {opt}, {cap}: {result['said']}")
    print("| path | s/step | MFU | peak GiB |\n|---|---|---|---|")
    for r in result["rows"]:
        if r["seconds"] is None:
            print(f"| {r['path']} | OOM | - | - |")
        else:
            print(f"| {r['path']} | {r['seconds']:.3f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} |")
    fits = [r for r in result["rows"][1:] if r["seconds"] is not None]
    auto = result["rows"][0]
    if fits and auto["seconds"] is not None:
        best = min(fits, key=lambda r: r["seconds"])
        ref = next((r for r in fits if r["fraction"] == 0.75), None)
        vs75 = f", {ref['seconds'] / auto['seconds']:.2f}x the 75% setting" if ref else ""
        print(f"auto checkpointing: {auto['fraction']:.0%} recomputed, {auto['mfu']:.1%} MFU, "
              f"{best['seconds'] / auto['seconds']:.3f}x the best fixed fraction that fits "
              f"({best['fraction']:.0%}){vs75}; "
              f"predicted peak {result['predicted_gib']:.1f} GiB, measured {auto['peak_gib']:.1f}")
