"""The logprob head's matrix products, alone: which cuBLAS kernel each runs and how fast (issue 23).

The profile of Qwen3.5-9B's packed ragged update on an H100 (bench/README.md) spent 12% of the step in two
cuBLAS kernels built for sm75 (`cutlass_75_tensorop_bf16_s1688gemm`), ~9 ms a call, ~230 TFLOP/s: by size the
products of `algo/logprobs.py`'s head, a chunk of trained rows against the whole vocabulary. This times each
of a chunk's products at the model's shapes, as the head computes them and laid out otherwise, names the
kernel each ran (the profiler's busiest CUDA kernel in it) and compares its speed with a square 8192^3 bf16
product measured in the same run (the baseline, near the GPU's best):

- `logits = h @ W.T` (the forward, and the backward's recompute): [n, H] x [H, V];
- `grad_h = G @ W`: [n, V] x [V, H], reducing over the vocabulary;
- `grad_W = G.T @ h`: [V, n] x [n, H] (and the same written `(h.T @ G).T`, and into the weight's gradient).

    python bench/head_gemm.py                  # Qwen3.5's 248,320 and Qwen3-VL's 151,936 vocabularies
    python bench/head_gemm.py --vocab 248320 --rows 1024 2048 4096
    python bench/head_gemm.py --cpu            # a small smoke run of the script on the CPU (float32)

Then the head as trained: `algo/logprobs.py`'s token_logprobs, forward and backward, over
`--trained-rows` rows (a packed micro-batch's trained tokens) in its 1,024-row chunks, with its compiled row
kernels (`fused`, as with train.compile; eager on the CPU), logits recomputed and kept, against the same
baseline, with the kernels that took the most time. Measured 2026-12-07 on one H200 (bench/README.md): alone,
the head runs only sm90 kernels at 248,320 (524 TF/s, as at 151,936), so the update's sm75 kernels are not
the head's as this computes it.
"""

from __future__ import annotations

import argparse
import time

import torch


def products(h: torch.Tensor, W: torch.Tensor, G: torch.Tensor, acc: torch.Tensor) -> dict:
    """The head's products of one chunk, each a function of no arguments."""
    return {
        "logits = h @ W.T": lambda: h @ W.T,
        "grad_h = G @ W": lambda: G @ W,
        "grad_W = G.T @ h": lambda: G.T @ h,
        "grad_W = (h.T @ G).T": lambda: (h.T @ G).T,
        "grad_W += G.T @ h (addmm_)": lambda: acc.addmm_(G.T, h),
    }


def timed(fn, sync, repeat: int) -> float:
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def kernels(fn, device) -> list:
    """The CUDA kernels of one call of `fn`, the most time first (profiler averages; none off the GPU)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"),
                  key=lambda e: -e.self_device_time_total)


def busiest_kernel(fn, device) -> str:
    """The CUDA kernel that took the most time in one call of `fn` ('-' off the GPU)."""
    if device.type != "cuda":
        return "-"
    events = kernels(fn, device)
    # (with the alignment suffix: `_align1` is an operand cuBLAS found misaligned)
    return events[0].key[:120] if events else "?"


def top_kernels(fn, device, n: int = 3) -> str:
    """The `n` CUDA kernels that took the most time in one call of `fn`, with calls ('-' off the GPU)."""
    if device.type != "cuda":
        return "-"
    return "; ".join(f"{e.key[:60]} x{e.count}" for e in kernels(fn, device)[:n])


def head_as_trained(V: int, hidden: int, rows: int, rand, sync, device, repeat: int, base: float) -> None:
    """token_logprobs forward + backward over `rows` trained rows, logits recomputed and kept: a row each."""
    from vlrl.algo.logprobs import token_logprobs

    W = (rand(V, hidden) * 0.02).requires_grad_()
    h0 = rand(rows, hidden)
    targets = torch.randint(0, V, (rows,), device=device)
    fused = device.type == "cuda"
    for keep in (False, True):
        def step():
            h = h0.detach().requires_grad_()
            W.grad = None
            logprobs, _ = token_logprobs(h, W, targets, fused=fused, keep_logits=keep)
            logprobs.sum().backward()

        t = timed(step, sync, repeat)
        products = 3 if keep else 4  # the forward's logits (and the backward's again), grad_h, grad_W
        rate = products * 2 * rows * hidden * V / t / 1e12
        label = f"token_logprobs fwd+bwd, logits {'kept' if keep else 'recomputed'}"
        print(f"| {V:,} | {rows} | {label} | - | {t * 1e3:.2f} | {rate:.1f} | {rate / base:.2f} | "
              f"{top_kernels(step, device)} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[248320, 151936])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 2048, 4096],
                    help="rows of a chunk (algo/logprobs.py's chunk_size: 1024)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"],
                    help="torch.backends.cuda.preferred_blas_library for each row, in turn (the GPU only)")
    ap.add_argument("--trained-rows", type=int, default=13000,
                    help="rows of the head as trained (a 16k-token packed micro-batch's trained tokens)")
    ap.add_argument("--cpu", action="store_true", help="float32 on the CPU, small shapes: the script runs")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        args.vocab, args.hidden, args.rows, args.repeat, args.trained_rows = [4099], 256, [64, 128], 2, 300
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    side = 8192 if device.type == "cuda" else 512
    a, b = rand(side, side), rand(side, side)
    base = 2 * side**3 / timed(lambda: a @ b, sync, args.repeat) / 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; baseline: a square {side}^3 product, {base:.1f} TFLOP/s")
    print("| vocab | rows | product | BLAS | ms | TFLOP/s | vs baseline | busiest kernel |")
    print("|---|---|---|---|---|---|---|---|")
    libraries = args.blas if device.type == "cuda" else ["-"]
    for V in args.vocab:
        W = rand(V, args.hidden)
        acc = torch.zeros_like(W)
        for n in args.rows:
            h, G = rand(n, args.hidden), rand(n, V)
            flop = 2 * n * args.hidden * V
            for label, fn in products(h, W, G, acc).items():
                for library in libraries:
                    if library != "-":
                        torch.backends.cuda.preferred_blas_library(library)
                    t = timed(fn, sync, args.repeat)
                    rate = flop / t / 1e12
                    print(f"| {V:,} | {n} | {label} | {library} | {t * 1e3:.2f} | {rate:.1f} | "
                          f"{rate / base:.2f} | {busiest_kernel(fn, device)} |", flush=True)
            del h, G
        del W, acc
        head_as_trained(V, args.hidden, args.trained_rows, rand, sync, device, args.repeat, base)
    if device.type == "cuda":
        torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
