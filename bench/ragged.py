"""The ragged case of `update_step.py`: a GRPO step as users run it, padded (today) against packed.

64 rollouts = 8 prompts x groups of 8 (a group's rollouts share prompt and image), each prompt 100 text tokens
+ one 448x448 image, completion lengths log-normal (median 400, sigma 0.8, clipped to 16..2048), seeded. The
same batch is updated by:
- padded, in order: today's shipped path (`plan_micro_batches` in batch order, micro_batch_size 8,
  micro_batch_tokens 16384);
- padded, length-sorted: the same planner on the samples sorted by length;
- packed: first-fit decreasing within 16384 tokens, one row per attention route available on the device.
Each row: seconds per update, useful (non-padding) tokens/s, MFU on useful tokens (6N per useful token), the
padding fraction of the computed tokens, peak memory. Then packed against padded for exactness (logprobs and
gradients, on the first two groups). With `--compile`, before all of it: the graphs compiled by 20 ragged
packed steps run from the freshly compiled layers, step by step.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vlrl.batch import plan_micro_batches
from vlrl.planner import StepPlan, micro_batch_tokens, pack_micro_batches
from vlrl.records import EncodedPrompt, Rollout
from vlrl.update import accumulate_gradients


@dataclass
class RaggedSpec:
    prompts: int = 8
    group: int = 8
    prompt_text: int = 100  # text tokens of a prompt, besides its image
    image_side: int = 448
    median: float = 400.0  # completion lengths: log-normal
    sigma: float = 0.8
    shortest: int = 16
    longest: int = 2048
    micro_batch_size: int = 8  # the padded planner's (configs/qwen3-vl-8b.toml)
    micro_batch_tokens: int = 16384
    seed: int = 0

    @classmethod
    def tiny(cls) -> RaggedSpec:
        return cls(prompts=4, group=4, prompt_text=20, image_side=64, median=40.0, shortest=4, longest=160,
                   micro_batch_size=4, micro_batch_tokens=512)



# the completion clip: only Dr.GRPO's constant normaliser reads it (the bench uses token-mean)
MAX_NEW_TOKENS = 2048

def completion_lengths(spec: RaggedSpec, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return [int(min(max(round(spec.median
                              * math.exp(spec.sigma * float(v))), spec.shortest), spec.longest)) for v in z]


def ragged_rollouts(adapter, spec: RaggedSpec, vocab: int, vision_start: int, vision_end: int,
                    seed: int | None = None, prompts: int | None = None) -> list[Rollout]:
    """`prompts` groups of `spec.group` rollouts: text, one image, text; a log-normal completion each."""
    seed = spec.seed if seed is None else seed
    prompts = spec.prompts if prompts is None else prompts
    g = torch.Generator().manual_seed(1000 + seed)
    grid = spec.image_side // 16
    high = min(vocab - 8, 150000, adapter.image_token_id - 5)  # text ids: below every special token
    lengths = completion_lengths(spec, prompts * spec.group, seed)
    rollouts = []
    for p in range(prompts):
        text = torch.randint(0, high, (spec.prompt_text,), generator=g).tolist()
        ids = text[: spec.prompt_text // 2] + [vision_start] + [adapter.image_token_id] * (grid * grid // 4)
        ids += [vision_end] + text[spec.prompt_text // 2 :]
        prompt = EncodedPrompt(input_ids=ids, messages=[], images=[],
                               pixel_values=torch.randn(grid * grid, 1536, generator=g),
                               image_grid_thw=torch.tensor([[1, grid, grid]]))
        for k in range(spec.group):
            n = lengths[p * spec.group + k]
            rollouts.append(Rollout(prompt=prompt,
                                    completion_ids=torch.randint(0, high, (n,), generator=g).tolist(),
                                    logprobs=[0.0] * n, finish_reason="length",
                                    advantage=float(torch.randn(1, generator=g))))
    return rollouts


def plans(batch, spec: RaggedSpec) -> dict[str, StepPlan]:
    lengths, patches = batch.lengths, batch.patches_per_sample
    order = sorted(range(batch.size), key=lambda i: lengths[i])
    sorted_groups = plan_micro_batches([lengths[i] for i in order], spec.micro_batch_size,
                                       spec.micro_batch_tokens,
                                       [patches[i] for i in order])
    return {
        "padded, in order "
        "(today)": StepPlan(plan_micro_batches(lengths, spec.micro_batch_size, spec.micro_batch_tokens,
                                                                patches), packed=False),
        "padded, length-sorted": StepPlan([[order[i] for i in g] for g in sorted_groups], packed=False),
        "packed": StepPlan(pack_micro_batches(lengths, spec.micro_batch_tokens, patches), packed=True),
    }


def padding_fraction(batch, plan: StepPlan) -> float:
    computed = micro_batch_tokens(batch.lengths, plan.micro_batches, plan.packed)
    return 1 - sum(batch.lengths) / sum(computed)


def routes(device: torch.device) -> list[str]:
    """The packed attention routes this device runs with a backward pass (FlexAttention has none on the
    CPU)."""
    if device.type != "cuda":
        return ["sdpa"]
    from vlrl.adapters.packing import _varlen_attn

    return (["varlen"] if _varlen_attn() is not None else []) + ["flex"]


def own_logprobs(policy, batch, plan: StepPlan, device) -> None:
    """Behavior logprobs near the policy's own (as a sampler's are): ratios near 1, nothing masked. Runs the
    plan's padding passes too (under FSDP every rank must run as many forward passes as the others)."""
    from vlrl.batch import batch_logprobs

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for idx, _ in plan.passes:
            lp, _ = batch_logprobs(policy, plan.micro_batch(batch, idx).to(device))
            lp = lp.float().cpu()
            noise = 0.05 * torch.randn(lp.shape, generator=g)
            batch.behavior_logprobs[idx, : lp.shape[1]] = (lp + noise) * batch.loss_mask[idx, : lp.shape[1]]


def compiles() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def spec_from_args(args, micro_batch_tokens: int | None = None) -> RaggedSpec:
    """The ragged batch `bench/update_step.py`'s `--ragged*` flags describe (`--tiny`: the CPU one), packed within
    `micro_batch_tokens` (default: the first `--ragged-tokens`)."""
    if args.tiny:
        return RaggedSpec.tiny()
    spec = RaggedSpec(args.ragged[0], args.ragged[1], seed=args.ragged_seed)
    spec.median, spec.sigma = args.ragged_median, args.ragged_sigma
    spec.shortest, spec.longest = args.ragged_clip
    spec.micro_batch_tokens = micro_batch_tokens or args.ragged_tokens[0]
    return spec


def run_ragged(model, adapter, policy, device, args, settings, n_params, peak_tflops, ids, sync, set_mode,
               grads_of,
               rel_err) -> dict:
    """Times every path on one ragged batch; returns rows, exactness and compile counts (and prints them)."""
    spec = spec_from_args(args)
    vocab, v_start, v_end = ids
    make = lambda seed=None, prompts=None: adapter.build_batch(  # noqa: E731
        ragged_rollouts(adapter, spec, vocab, v_start, v_end, seed, prompts))
    batch = make()
    useful = sum(batch.lengths)
    all_plans = plans(batch, spec)
    name = (f"ragged: {spec.prompts} prompts x {spec.group}, {spec.prompt_text} text tokens + one "
            f"{spec.image_side}px "
            f"image, completions log-normal (median {spec.median:g}, sigma {spec.sigma:g}, "
            f"{spec.shortest}..{spec.longest})")
    print(f"\n{name}: {useful:,} useful tokens; lengths "
          f"{min(batch.lengths)}..{max(batch.lengths)}", flush=True)
    set_mode()
    policy.packed_attention = routes(device)[0]  # the default route (`auto`) for what is not per route
    compiled_before = compiles()
    counted = None
    # first, from the freshly compiled layers: what a training run's first 20 steps compile
    if args.compile and args.compile_steps:
        counted = count_compiles(model, policy, device, settings, make, args.compile_steps,
                                 spec.micro_batch_tokens)
    own_logprobs(policy, batch, all_plans["packed"], device)

    def update(plan):
        def step():
            model.zero_grad(set_to_none=True)
            accumulate_gradients(policy, batch, plan, settings, MAX_NEW_TOKENS, device)
        return step

    rows = []
    variants = [(label, plan, None) for label, plan in all_plans.items() if not plan.packed]
    variants += [(f"packed, {route} attention", all_plans["packed"], route) for route in routes(device)]
    for label, plan, route in variants:
        if args.skip and any(s in label for s in args.skip):
            continue
        if route is not None:
            policy.packed_attention = route
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        fn = update(plan)
        try:
            t0 = time.perf_counter()
            fn()  # first pass (compiles with --compile): not timed
            sync(device)
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.ragged_repeat):
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
        # a route this torch cannot run
        except (torch.OutOfMemoryError, RuntimeError, NotImplementedError) as e:
            print(f"  {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            rows.append(dict(path=label, seconds=None, error=type(e).__name__))
            model.zero_grad(set_to_none=True)
            continue
        t = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        mfu = 6 * n_params * useful / t / (peak_tflops * 1e12)
        row = dict(path=label, seconds=t, tokens_per_s=useful / t, mfu=mfu,
                   padding=padding_fraction(batch, plan),
                   peak_gib=peak, micro_batches=len(plan.micro_batches), first_s=first, packed=plan.packed)
        rows.append(row)
        print(f"  {label}: {t:.3f} s, {useful / t:,.0f} useful tokens/s, MFU {mfu:.1%}, padding "
              f"{row['padding']:.1%}, "
              f"{len(plan.micro_batches)} micro-batches, peak {peak:.1f} GiB (first pass {first:.1f} "
              "s)", flush=True)
    if getattr(args, "profile", False) and device.type == "cuda":
        policy.packed_attention = routes(device)[0]
        print(f"  kernels of one packed ragged update ({policy.packed_attention} attention), by own time:")
        kernel_table(update(all_plans["packed"]), sync, device)
    model.zero_grad(set_to_none=True)
    out = {"case": name, "useful_tokens": useful, "rows": rows, "compiled_graphs": compiles()
           - compiled_before}
    skipped = [r for r in routes(device) if args.skip
               and any(x in f"packed, {r} attention" for x in args.skip)]
    out["exactness"] = exactness(model, adapter, policy, device, settings, make, spec, grads_of,
                                 rel_err, skipped)
    if counted is not None:
        out["compiles"] = counted
    return out


def kernel_table(fn, sync, device, rows: int = 18) -> None:
    """The CUDA operators and kernels that take the time of one call of `fn` (after a warm-up call), sorted by
    each one's own kernel time: under non-reentrant checkpointing a layer's recomputed forward runs inside the
    first backward node that unpacks a saved tensor, and a total with children charges it there."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        sync(device)
    # first, so that a run cut short still has it: which product (and at which shapes) ran each slow kernel
    print("  matrix-product kernels by the op and input shapes that launched them: " + "; ".join(
        f"{kernel[:70]} <- {op} {shapes} x{calls}: {ms:.0f} ms" for kernel, op, shapes, ms, calls
        in kernels_by_product(prof.events(), rows // 2)), flush=True)
    averages = prof.key_averages()
    # (wide names: a cuBLAS kernel's ends with its alignment, `_align1` for an operand it found misaligned)
    print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=110), flush=True)
    products = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm")),
                      key=lambda e: -e.device_time_total)[:rows // 2]
    print("  matrix products by input shapes: " + "; ".join(
        f"{e.key} {e.input_shapes} x{e.count}: {e.device_time_total / 1e3:.0f} ms" for e in products), flush=True)
    # the host's side: what keeps the GPU waiting when its kernels add up to less than the wall time
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    kernels = sum(e.self_device_time_total for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    print(f"  GPU kernels {kernels:.3f} s in {wall:.3f} s of wall time (unprofiled): the GPU busy "
          f"{kernels / wall:.0%}", flush=True)
    sync_sites(fn, sync, device)


PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::_scaled_mm")


def kernels_by_product(events, rows: int = 9) -> list[tuple[str, str, str, float, int]]:
    """The GPU kernels the matrix-product ops launched, each with the op and input shapes it ran at: rows of
    (kernel, op, shapes, ms, calls), the most time first. A kernel belongs to the innermost op that launched it
    (a profiler event's `kernels`), so a product inside `aten::linear` or a compiled graph is found as itself.
    Why: a kernel's name alone (a cuBLAS fallback built for an older GPU, say) does not say which of the
    model's products ran it."""
    table: dict[tuple[str, str, str], list] = {}
    for event in events:
        if event.name not in PRODUCT_OPS:
            continue
        for kernel in event.kernels:
            row = table.setdefault((kernel.name, event.name, str(event.input_shapes)), [0.0, 0])
            row[0] += kernel.duration / 1e3  # microseconds -> ms
            row[1] += 1
    ranked = sorted(table.items(), key=lambda item: -item[1][0])[:rows]
    return [(kernel, op, shapes, ms, calls) for (kernel, op, shapes), (ms, calls) in ranked]


def sync_sites(fn, sync, device, rows: int = 15) -> None:
    """Where one call of `fn` makes the host wait for the GPU (torch's sync debug mode), by the innermost
    Python frame outside torch: each wait drains the GPU's queue, and the GPU idles until the host has
    launched enough work again."""
    import collections
    import traceback
    import warnings

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings.py" not in f.filename]
        f = frames[-1] if frames else None
        sites[f"{Path(f.filename).name}:{f.lineno} {f.name}: {(f.line or '').strip()[:70]}" if f else "?"] += 1

    shown = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    sync(device)
    print(f"  host waits for the GPU in one call: {sum(sites.values())}; where:", flush=True)
    for site, n in sites.most_common(rows):
        print(f"    {n:4d}  {site}", flush=True)


def exactness(model, adapter, policy, device, settings, make, spec, grads_of, rel_err, skipped=()) -> dict:
    """Packed (each route) against padded in order, on the first two groups: logprob max |diff| and the
    largest relative gradient error over the checked parameters."""
    batch = make(prompts=min(2, spec.prompts))
    padded = plans(batch, spec)["padded, in order (today)"]
    from vlrl.batch import batch_logprobs

    def run(plan):
        model.zero_grad(set_to_none=True)
        lp = torch.zeros_like(batch.loss_mask)
        with torch.no_grad():
            for idx in plan.micro_batches:
                got, _ = batch_logprobs(policy, plan.micro_batch(batch, idx).to(device))
                lp[idx, : got.shape[1]] = got.float().cpu()
        accumulate_gradients(policy, batch, plan, settings, MAX_NEW_TOKENS, device)
        return lp, grads_of(model, device.type == "cpu")

    own_logprobs(policy, batch, padded, device)
    out = {}
    try:
        want_lp, want_g = run(padded)
        # the floor: the same padded path with its micro-batches composed otherwise (other padding, other
        # kernels' tiles): what bf16 alone moves between two exact computations
        lp, g = run(plans(batch, spec)["padded, length-sorted"])
        m = batch.loss_mask.bool()
        out["padded, sorted (bf16 noise floor)"] = (float((lp - want_lp)[m].abs().max()),
                                                     max(rel_err(g[k], want_g[k]) for k in want_g))
        for route in [r for r in routes(device) if r not in skipped]:
            policy.packed_attention = route
            try:
                lp, g = run(StepPlan(pack_micro_batches(batch.lengths, spec.micro_batch_tokens), packed=True))
            except (torch.OutOfMemoryError, RuntimeError, NotImplementedError) as e:
                out[route] = f"{type(e).__name__}"
                continue
            m = batch.loss_mask.bool()
            out[route] = (float((lp - want_lp)[m].abs().max()), max(rel_err(g[k], want_g[k]) for k in want_g))
    finally:
        model.zero_grad(set_to_none=True)
    for route, v in out.items():
        if isinstance(v, tuple):
            print(f"  {route if route.startswith('padded') else f'packed ({route})'} vs padded: logprob max "
                  f"|diff| {v[0]:.2e}, grad max rel err {v[1]:.2e}", flush=True)
        else:
            print(f"  packed ({route}) vs padded: {v}", flush=True)
    return out


def count_compiles(model, policy, device, settings, make, steps: int, budget: int) -> dict:
    """Graphs compiled over `steps` ragged packed steps, each a new batch (2 prompts' groups, new lengths):
    the first step's and the rest's. Ragged shapes should not recompile every step."""
    per_step = []
    for s in range(steps):
        batch = make(seed=10_000 + s, prompts=2)
        plan = StepPlan(pack_micro_batches(batch.lengths, budget, batch.patches_per_sample), True)
        before = compiles()
        model.zero_grad(set_to_none=True)
        accumulate_gradients(policy, batch, plan, settings, MAX_NEW_TOKENS, device)
        per_step.append(compiles() - before)
    model.zero_grad(set_to_none=True)
    out = {"steps": steps, "first": per_step[0], "rest": sum(per_step[1:]), "per_step": per_step,
           "route": policy.packed_attention}
    print(f"  compiles over {steps} ragged packed steps ({policy.packed_attention} attention): {per_step[0]} "
          f"graphs in the first, {out['rest']} in the {steps - 1} after ({per_step})", flush=True)
    return out


def print_table(result: dict) -> None:
    """The ragged case's rows as a Markdown table (bench/README.md's), exactness and compile counts after
    it."""
    print(f"\n{result['case']}; {result['useful_tokens']:,} useful tokens; MFU on useful tokens (6N each)")
    print("| path | s | useful tokens/s | MFU | padding | micro-batches | peak GiB "
          "|\n|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        if row.get("seconds") is None:
            print(f"| {row['path']} | {row['error']} | - | - | - | - | - |")
            continue
        print(f"| {row['path']} | {row['seconds']:.3f} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | "
              f"{row['padding']:.1%} | {row['micro_batches']} | {row['peak_gib']:.1f} |")
    for route, v in result["exactness"].items():
        detail = v if isinstance(v, str) else f"logprob max abs diff {v[0]:.2e}, grad max rel err {v[1]:.2e}"
        print(f"| packed ({route}) vs padded | {detail} | | | | | |")
    c = result.get("compiles")
    if c:
        print(f"compiles over {c['steps']} ragged packed steps ({c['route']} attention): {c['first']} graphs "
              f"in the first step, {c['rest']} in the {c['steps'] - 1} after")


def summary_line(result: dict) -> str:
    """`ragged update: packed vs padded X.XXx, padding A% -> B%` (the best packed route against today's
    path)."""
    rows = [r for r in result["rows"] if r.get("seconds")]
    today = next((r for r in rows if r["path"].startswith("padded, in order")), None)
    packed = [r for r in rows if r["packed"]]
    if today is None or not packed:
        return "ragged update: packed vs padded nan, padding nan -> nan"
    best = min(packed, key=lambda r: r["seconds"])
    return (f"ragged update: packed vs padded {today['seconds'] / best['seconds']:.2f}x, padding "
            f"{today['padding']:.0%} -> {best['padding']:.0%}")
