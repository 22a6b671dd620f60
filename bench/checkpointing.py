"""`train.checkpoint_fraction = "auto"` against fixed fractions: the update with its AdamW step, one process.

Called by `bench/update_step.py --auto` (with `--optimizer` and `--memory-caps GIB...`, standing in for a
smaller card on a larger one).
- `run`: the equal-length case (8 x 1041 tokens by default), compiled layers: `auto` decides as `vlrl train`
  does at its first update (probe passes on the micro-batch, the optimizer's state still to come) and is timed
  at what it chose, then each fixed fraction (1, 0.75, 0.5, 0.25, 0) is timed.
- `run_ragged`: the ragged GRPO batch as shipped (`bench/ragged.py`'s: packed micro-batches within the token
  budget, the default attention route, compiled layers with `--compile`, fused AdamW, grad clipping): `auto`
  decides exactly as `Run.update` calls it (the largest micro-batch as the probe, the token budget as the cap,
  AdamW's state not yet allocated), then steps are timed; `--ragged-fixed` adds fixed ladder levels.
Each row: seconds per step (update + optimizer step), MFU (6N per useful token), peak GiB (allocated, over
every step, the first included), or OOM. Auto runs first, before fixed settings fragment the allocator.
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace

import ragged  # noqa: E402  (bench/ragged.py, beside this script)
import torch

from vlrl.activation_memory import GIB, AutoCheckpointing, Head, gradient_bytes, kinds
from vlrl.adapters.qwen3_vl import set_checkpointing
from vlrl.optimizer_offload import StateOffload
from vlrl.planner import StepPlan, micro_batch_tokens, pack_micro_batches
from vlrl.update import accumulate_gradients

FIXED = (1.0, 0.75, 0.5, 0.25, 0.0)


def run(model, adapter, policy, device, args, settings, rollouts, tools) -> dict:
    """`tools`: the bench's helpers (timed, set_trainable, non_embedding_params, peak TFLOP/s)."""
    set_cap(device, args.memory_cap)
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

    auto = AutoCheckpointing(lambda f, s: set_checkpointing(model, f, s),
                             len(model.model.language_model.layers), device)

    def probe():
        update()
        model.zero_grad(set_to_none=True)

    said = auto.decide(probe, params, optimizer_has_state=not args.optimizer, agree=lambda values, op: values,
                       probe_tokens=tokens, token_cap=None, accumulates=False)
    rows = [timed_row(f"auto ({auto_label(auto)})", auto.fraction)]
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


def set_cap(device, cap_gib: float) -> None:
    """Cap this process's share of the GPU at `cap_gib` (0: the whole card)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0, index)


def auto_label(auto) -> str:
    full, sel = kinds(auto.level, auto.layers)
    head = ", logits kept" if auto.choice is not None and auto.choice.keep_logits else ""
    return f"{full} full, {sel} selective, {auto.layers - full - sel} keep{head}"


def run_ragged(model, adapter, policy, device, args, settings, tools, ids, cap_gib: float = 0.0,
               offload: bool | str = False, token_budget: int | None = None, floor: int = 0) -> dict:
    """`auto` on the ragged batch as `vlrl train` runs it (module docstring); `tools` as for `run`, plus sync.
    `offload`: `train.offload_optimizer` (True, False or "auto": `Run.update`'s calls: the longest micro-batch
    last, the moments' bytes kept on the host told to the chooser, the offload's calls around each backward and
    the AdamW step; "auto": measured both ways, kept where the chooser says). `floor`: `model.max_model_len`,
    below which `auto` does not halve the token budget (`AutoCheckpointing.decide_budget`; 0: the batch's
    longest sample)."""
    spec = ragged.spec_from_args(args, token_budget)
    vocab, v_start, v_end = ids
    batch = adapter.build_batch(ragged.ragged_rollouts(adapter, spec, vocab, v_start, v_end))
    useful = sum(batch.lengths)
    floor = floor or max(batch.lengths)
    planned: dict[int, tuple] = {}

    def plan_within(budget: int) -> tuple[StepPlan, list[int], list[int]]:
        """(plan, tokens each micro-batch computes, the largest micro-batch) within `budget`, as Run._plan."""
        if budget not in planned:
            plan = StepPlan(pack_micro_batches(batch.lengths, budget, batch.patches_per_sample), packed=True)
            computed = micro_batch_tokens(batch.lengths, plan.micro_batches, plan.packed)
            if offload:  # as Run.update: the longest micro-batch last
                last = computed.index(max(computed))
                plan.micro_batches.append(plan.micro_batches.pop(last))
                computed.append(computed.pop(last))
            planned[budget] = plan, computed, plan.micro_batches[computed.index(max(computed))]
        return planned[budget]

    plan, computed, _ = plan_within(spec.micro_batch_tokens)
    on_gpu = device.type == "cuda"
    if on_gpu:
        set_cap(device, cap_gib)
    policy.packed_attention = ragged.routes(device)[0]
    tools.set_trainable(model, vision=False, checkpointing=True, fraction=1.0)
    ragged.own_logprobs(policy, batch, plan, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = tools.non_embedding_params(model)
    layers = len(model.model.language_model.layers)

    opt = torch.optim.AdamW(params, lr=1e-7, fused=on_gpu)
    moved = StateOffload(opt, params, gradient_bytes(params), device, pace=not args.unpaced_offload) if offload else None

    def update(p, fetch: bool = True):
        accumulate_gradients(policy, batch, p, settings, ragged.MAX_NEW_TOKENS, device,
                             before_backward=moved.before_backward if moved is not None and fetch else None)

    def timed_steps(label: str, tail: bool = False) -> dict:
        """Steps of update + clip + fused AdamW from a fresh optimizer state: the first (AdamW's state allocated,
        graphs compiled) untimed, then --ragged-repeat timed back to back, to the end of the last step's work on
        the compute stream: the moments' copy back to the host overlaps the next step, as it overlaps the weight
        sync and rollouts in training (a device-wide sync at the end charged the last step's copy, 0.31 s for
        15 GiB on an H100, to the steps: half of it a step at --ragged-repeat 2); the peak over all of them.
        `tail`: then one more update, and what follows its last backward timed alone (the part of a step an
        asynchronous run's streamed update cannot overlap with sampling, besides the last micro-batch:
        bench/async_rollouts.py --optimizer-s)."""
        gc.collect()
        opt.state.clear()  # (the offload's pinned buffers are kept: written again after the first step)
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            update(plan)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if moved is not None:
                moved.before_step()
            opt.step()
            if moved is not None:
                moved.after_step()
            opt.zero_grad(set_to_none=True)

        def compute_done():  # the compute stream's work finished (not the copy stream's)
            if on_gpu:
                event = torch.cuda.Event()
                event.record()
                event.synchronize()

        try:
            step()
            tools.sync(device)
            n = max(args.ragged_repeat, 1)
            if moved is not None and on_gpu:
                moved.waits = []
            retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if on_gpu else 0
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            compute_done()
            t = (time.perf_counter() - t0) / n
            tools.sync(device)
            retries = (torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries) if on_gpu else 0
            waits: dict[str, float] = {}
            for what, start, end in (moved.waits or []) if moved is not None else []:
                waits[what] = waits.get(what, 0.0) + start.elapsed_time(end) / 1000 / n
            if moved is not None:
                moved.waits = None
            if tail:  # what follows the last backward: the streamed update's gradient scaling, clip, AdamW
                update(plan)
                tools.sync(device)
                t1 = time.perf_counter()
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                if moved is not None:  # (the moments still on their way are waited for here)
                    moved.before_step()
                opt.step()
                if moved is not None:
                    moved.after_step()
                opt.zero_grad(set_to_none=True)
                compute_done()
                tail_s = time.perf_counter() - t1
                tools.sync(device)
                copy_back_s = time.perf_counter() - t1 - tail_s
        except torch.OutOfMemoryError as e:
            model.zero_grad(set_to_none=True)
            if moved is not None:
                moved.drop()
            allocated = torch.cuda.max_memory_allocated(device) / GIB
            print(f"  {label}: OOM (allocated peak {allocated:.1f} GiB): {str(e).splitlines()[0][:160]}", flush=True)
            return {"path": label, "seconds": None, "peak_gib": allocated}
        peak = torch.cuda.max_memory_allocated(device) / GIB if on_gpu else float("nan")
        row = {"path": label, "seconds": t, "mfu": 6 * n_params * useful / t / (tools.peak_tflops * 1e12),
               "peak_gib": peak}
        print(f"  {label}: {t:.3f} s, MFU {row['mfu']:.1%} on useful tokens, peak {peak:.1f} GiB", flush=True)
        if on_gpu:  # an allocation that failed and was retried after freeing the cache: a device-wide sync
            print(f"    allocator retries (cache freed, device synchronised): {retries / n:.1f} a step" +
                  "".join(f"; GPU waited for the moments' copies {what}: {s:.3f} s a step"
                          for what, s in waits.items()), flush=True)
        if tail:
            row["tail_s"] = tail_s
            copy = f"; the moments' copy back to the host ends {copy_back_s:.3f} s after it" if moved is not None else ""
            print(f"  of a step, after the last backward (gradient scaling + clip + AdamW): {tail_s:.3f} s{copy}",
                  flush=True)
        return row

    weight = model.get_output_embeddings().weight
    head = Head(lambda keep: setattr(policy, "keep_logits", keep), weight.shape[0] * weight.element_size(),
                weight.numel() / sum(p.numel() for p in model.model.language_model.layers[0].parameters()))
    auto = AutoCheckpointing(lambda f, s: set_checkpointing(model, f, s), layers, device, head)

    def decide_at(budget: int) -> str:  # as Run._decide
        nonlocal plan, computed
        plan, computed, biggest = plan_within(budget)

        def probe(fetch: bool = True):  # as Run._probe: the largest micro-batch alone, its gradients dropped
            try:
                update(replace(plan, micro_batches=[biggest], padding_passes=0), fetch)
            finally:
                model.zero_grad(set_to_none=True)
                if moved is not None:
                    moved.drop()

        return auto.decide(probe, params, optimizer_has_state=False, agree=lambda values, op: values,
                           probe_tokens=max(computed), token_cap=budget,
                           probe_trained=int(batch.loss_mask[biggest].sum()),
                           offloaded=moved.bytes if moved is not None else 0,
                           probe_without_offload=(lambda: probe(False)) if offload == "auto" else None)

    budget, said = auto.decide_budget(decide_at, spec.micro_batch_tokens, floor)
    plan, computed, _ = plan_within(budget)
    if moved is not None and auto.offload_declined:  # as Run._decide
        moved.restore()
        moved = None
    if moved is not None:
        said += "; " + moved.describe()
    where = "capped at %g GiB" % cap_gib if cap_gib else "the whole card"
    print(f"  ragged, {where}, offload_optimizer = {str(offload).lower()}: {said}", flush=True)
    rows = [timed_steps(f"auto ({auto_label(auto)})", tail=True)]
    rows[0]["fraction"], rows[0]["level"] = auto.fraction, auto.level
    for full, sel in args.ragged_fixed:
        set_checkpointing(model, full, sel)
        policy.keep_logits = False
        rows.append(timed_steps(f"fixed: {full:.0%} full, {sel:.0%} selective"))
        rows[-1]["fraction"] = full
    policy.keep_logits = False
    model.zero_grad(set_to_none=True)
    if moved is not None:
        moved.settle()
        moved.close()
    opt.state.clear()
    choice = auto.choice
    return {"said": said, "rows": rows, "cap_gib": cap_gib, "useful": useful, "micro_batches": computed,
            "micro_batch_tokens": budget, "asked_tokens": spec.micro_batch_tokens,
            "offload": offload, "offloaded": not auto.offload_declined if offload == "auto" else bool(offload),
            "predicted_gib": choice.predicted_peak / GIB if choice else float("nan"),
            "bound_gib": choice.bound / GIB if choice else float("nan"),
            "probes_gib": {kinds(lv, layers): v / GIB for lv, v in auto.measured.items()}}


def offload_words(result: dict) -> str:
    """How AdamW's state was held: `offload_optimizer` and, for "auto", what the chooser kept."""
    if result["offload"] == "auto":
        return "offload auto: " + ("state offloaded" if result["offloaded"] else "state on the GPU")
    return "state offloaded" if result["offload"] else "state on the GPU"


def print_ragged(result: dict) -> None:
    cap = f"capped at {result['cap_gib']:g} GiB" if result["cap_gib"] else "the whole card"
    cap += f", {offload_words(result)} (train.offload_optimizer)"
    if result["micro_batch_tokens"] != result["asked_tokens"]:
        cap += f", micro_batch_tokens {result['asked_tokens']} halved by auto to {result['micro_batch_tokens']}"
    print(f"\nragged batch as shipped, {result['useful']:,} useful tokens in micro-batches of {result['micro_batches']} "
          f"tokens, update + AdamW step, {cap}: {result['said']}")
    probes = ", ".join(f"{f} full + {s} selective: {g:.1f}" for (f, s), g in result["probes_gib"].items())
    if probes:
        print(f"probe peaks (GiB, gradients allocated, AdamW state not yet): {probes}")
    print("| path | s/step | MFU (useful) | peak GiB | predicted GiB |\n|---|---|---|---|---|")
    for i, r in enumerate(result["rows"]):
        pred = f"{result['predicted_gib']:.1f}" if i == 0 else "-"
        if r["seconds"] is None:
            print(f"| {r['path']} | OOM | - | {r['peak_gib']:.1f} | {pred} |")
        else:
            print(f"| {r['path']} | {r['seconds']:.3f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | {pred} |")


def ragged_line(result: dict) -> str:
    """`ragged as shipped (auto, AdamW): X% useful MFU, fraction F, predicted P GiB, measured M GiB`."""
    r = result["rows"][0]
    mfu = f"{r['mfu']:.1%}" if r["seconds"] is not None else "OOM,"
    cap = f" under a {result['cap_gib']:g} GiB cap" if result["cap_gib"] else ""
    tokens = result["micro_batch_tokens"]
    cap += (f", micro_batch_tokens {tokens}" if tokens == result["asked_tokens"]
            else f", micro_batch_tokens {result['asked_tokens']} (auto: {tokens})")
    return (f"ragged as shipped (auto, AdamW, {offload_words(result)}){cap}: {mfu} useful MFU, fraction {r['fraction']:.2f} "
            f"({r['path'][6:-1]}), predicted {result['predicted_gib']:.1f} GiB, measured {r['peak_gib']:.1f} GiB")


def offload_exact(device, width: int = 4096, layers: int = 8, steps: int = 3) -> dict:
    """`train.offload_optimizer` against AdamW keeping its state on the device, on a stack of bf16 linear layers
    big enough that the copies overlap the backward (two passes a step, fused AdamW, clipping): the largest
    difference in weights and moments after `steps` steps (0.0: bit for bit)."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device, torch.bfloat16)

    def train(model, offload: bool):
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
        moved = StateOffload(opt, params, sum(2 * p.numel() * p.element_size() for p in params) // 2, device) \
            if offload else None
        gen = torch.Generator(device).manual_seed(1)
        for _ in range(steps):
            for i in range(2):
                loss = model(torch.randn(4096, width, device=device, dtype=torch.bfloat16, generator=gen)).float() \
                    .pow(2).mean()
                if moved is not None:
                    moved.before_backward(i, i == 1)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if moved is not None:
                moved.before_step()
            opt.step()
            if moved is not None:
                moved.after_step()
            opt.zero_grad(set_to_none=True)
        if moved is not None:
            moved.settle()
        return params, opt, (moved.bytes if moved is not None else 0)

    a, opt_a, _ = train(build(), False)
    b, opt_b, moved = train(build(), True)
    weights = max(float((x - y).detach().abs().max()) for x, y in zip(a, b))
    moments = max(float((opt_a.state[x][k].float() - opt_b.state[y][k].to(x.device).float()).abs().max())
                  for x, y in zip(a, b) for k in ("exp_avg", "exp_avg_sq"))
    return {"weights": weights, "moments": moments, "offloaded_gib": moved / GIB, "steps": steps}
