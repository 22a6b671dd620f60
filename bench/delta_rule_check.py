"""Is flash-linear-attention's chunked gated delta rule right on this GPU? (issue 23)

fla 0.6.0 refuses Hopper GPUs with Triton 3.4 .. 3.7.0 (fla#640: `chunk_bwd_kernel_dqkwg` transposes a matmul
result in registers and Triton miscompiles it, giving wrong dk and, through it, dg and dbeta). Upstream's own
bisection tied it to a key block of 64, and fla tiles keys by 128 on Hopper, so head dims of 128 (Qwen3.5's)
may never reach the bad tile. This measures it: fla's output and gradients with the guard lifted, against
transformers' recurrent reference (one token at a time, the definition of the rule) in float64, for each
head dim given, on packed sequences (`cu_seqlens`), in float32 and bfloat16 inputs. A head dim of 64 is the
positive control: it should show the bug where the bug is.

Each case runs three times: fla with vlrl's `chunk_bwd_dqkwg` in place of the one the guard names, in PyTorch
(`fla + vlrl torch`, vlrl/adapters/fla_hopper.py) and as vlrl's Triton kernel (`fla + vlrl triton`,
vlrl/adapters/dqkwg_kernel.py), and fla's own kernels (`fla`). `--time-tokens` then times forward + backward
of each at Qwen3.5-9B's shapes (32 heads of 128, one packed micro-batch of that many tokens, bf16).

    python bench/delta_rule_check.py --head-dims 128 64
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

# (label, VLRL_FLA_DQKWG): vlrl's dqkwg in PyTorch, as vlrl's Triton kernel, fla's own (guard lifted); then
# the control: transformers' chunked PyTorch rule (float32 inside), what the naive path and `torch` run
VARIANTS = (("fla + vlrl torch", "torch"), ("fla + vlrl triton", "triton"), ("fla", "0"),
            ("transformers chunked (float32 inside)", "reference"))


def reference(q, k, v, g, beta, cu, name="torch_recurrent_gated_delta_rule", dtype=torch.float64):
    """transformers' `torch_recurrent_gated_delta_rule` (or another of its PyTorch rules), per packed
    sequence, in float64 (or the inputs' own dtype with `dtype=None`): [1, T, H, V]."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    # (with fla installed, transformers' names dispatch to fla's kernels)
    rule = getattr(modeling_qwen3_5, name)
    rule = getattr(rule, "__wrapped__", rule)
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = [t[:, a:b].to(dtype or t.dtype) for t in (q, k, v, g, beta)]
        out, _ = rule(*part, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True)
        outs.append(out)
    return torch.cat(outs, 1)


def chunked_reference(q, k, v, g, beta, cu):
    """transformers' chunked PyTorch rule on the inputs as given (it computes in float32)."""
    return reference(q, k, v, g, beta, cu, "torch_chunk_gated_delta_rule", dtype=None)


def fla_rule(q, k, v, g, beta, cu):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    return out


def grads(fn, inputs, cu, d_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, cu)
    (out.double() * d_out).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[300, 517, 183])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                    help="input dtypes, in this order (bf16 first: the kernels a bf16 model compiles anyway)")
    ap.add_argument("--time-tokens", type=int, default=16384, help="tokens of the timed packed micro-batch "
                    "(0: no timing)")
    ap.add_argument("--kernels", nargs="+", default=[v for _, v in VARIANTS],
                    choices=[v for _, v in VARIANTS],
                    help="which rows (VLRL_FLA_DQKWG values; reference: the control)")
    ap.add_argument("--gating", choices=["trained", "init"], default="trained",
                    help="the gate's log decays: trained (near 0, slow decay) or init (Qwen3.5's "
                    "initialisation: -A softplus(a + 1), A ~ U(0.01, 16), as a random-weight model's"
                    " layers see)")
    ap.add_argument("--pick", help="write here the VLRL_FLA_DQKWG to use: triton where its errors were "
                    "within 1.5x of the PyTorch version's in every column, else torch")
    args = ap.parse_args()
    import fla.ops.common.chunk_o as chunk_o

    from vlrl.adapters.fla_hopper import register_backend

    chunk_o.TRITON_ABOVE_3_7_1 = True  # the guard lifted: what is measured is the kernel itself
    register_backend(force=True)  # (switched per row by its environment variable)
    import triton

    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    cu = torch.tensor([0] + list(torch.tensor(args.lengths).cumsum(0)), dtype=torch.int32, device=device)
    T, H = int(cu[-1]), args.heads
    names = ["output", "dq", "dk", "dv", "dg", "dbeta"]
    errors: dict[str, list[float]] = {}
    print("| head dim | inputs | kernels | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
    for D in args.head_dims:
        gen = torch.Generator(device).manual_seed(D)
        q, k, v = (torch.randn(1, T, H, D, device=device, generator=gen) for _ in range(3))
        g = gates(args.gating, T, H, device, gen)
        beta = torch.sigmoid(torch.randn(1, T, H, device=device, generator=gen))
        d_out = torch.randn(1, T, H, D, device=device, generator=gen, dtype=torch.float64)
        for dtype in args.dtypes:
            dtype = getattr(torch, dtype)
            cast = [t.to(dtype) for t in (q, k, v)] + [g, beta.to(dtype)]
            t0 = time.perf_counter()
            ref = grads(reference, cast, cu, d_out)  # (of the same, rounded, inputs)
            t1 = time.perf_counter()
            print(f"  head dim {D}, {str(dtype)[6:]}: reference {t1 - t0:.1f} s; fla (a first call compiles "
                  "and autotunes its kernels) ...", flush=True)
            for kernels, ours in [v for v in VARIANTS if v[1] in args.kernels]:
                os.environ["VLRL_FLA_DQKWG"] = ours
                t1 = time.perf_counter()
                try:
                    got = grads(chunked_reference if ours == "reference" else fla_rule, cast, cu, d_out)
                except Exception as e:  # (a kernel Triton cannot build here: the other rows still run)
                    print(f"| {D} | {str(dtype)[6:]} | {kernels} | {type(e).__name__}: {str(e)[:200]} |")
                    continue
                print(f"  ... {kernels} {time.perf_counter() - t1:.1f} s", flush=True)
                errs = [rel(a, b) for a, b in zip(got, ref)]
                errors.setdefault(ours, []).extend(errs)
                cells = " | ".join(f"{e:.1e}" for e in errs)
                print(f"| {D} | {str(dtype)[6:]} | {kernels} | {cells} |", flush=True)
    print("relative error: |fla - reference| / |reference| (Frobenius), the reference in float64")
    if args.pick:
        torch_errs, triton_errs = errors.get("torch", []), errors.get("triton", [])
        good = len(triton_errs) == len(torch_errs) > 0 and all(
            b <= 1.5 * a + 1e-6 for a, b in zip(torch_errs, triton_errs))
        with open(args.pick, "w") as f:
            f.write("triton" if good else "torch")
        print(f"picked: {'triton' if good else 'torch'}", flush=True)
    if args.time_tokens:
        timed = [v for v in VARIANTS if v[1] in args.kernels and v[1] != "reference"]
        timing(args.time_tokens, device, timed)


def gates(kind, T, H, device, gen):
    """The gate's log decay per token and head ([1, T, H], float32)."""
    a = torch.randn(1, T, H, device=device, generator=gen)
    if kind == "trained":
        return F.logsigmoid(a + 3)  # decays near 1
    A = torch.empty(H, device=device).uniform_(0.01, 16, generator=gen)
    return -A * F.softplus(a + 1)


def timing(tokens, device, variants, H=32, D=128, repeat=10):
    """Forward + backward of the rule over one packed micro-batch (samples of 400 tokens, the bench's median
    completion) at Qwen3.5-9B's linear-attention shapes, fla's dqkwg against vlrl's."""
    lengths = [400] * (tokens // 400) + ([tokens % 400] if tokens % 400 else [])
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    gen = torch.Generator(device).manual_seed(0)
    bf16 = dict(device=device, generator=gen, dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, tokens, H, D, **bf16) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, tokens, H, device=device, generator=gen) + 3)
    beta = torch.sigmoid(torch.randn(1, tokens, H, device=device, generator=gen)).bfloat16()
    d_out = torch.randn(1, tokens, H, D, **bf16)
    leaves = [t.requires_grad_(True) for t in (q, k, v, g, beta)]
    print(f"\n| kernels | fwd + bwd ms ({tokens} tokens, {H} heads of {D}, bf16) |\n|---|---|")
    for kernels, ours in variants:
        os.environ["VLRL_FLA_DQKWG"] = ours
        try:
            for i in range(repeat + 2):
                if i == 2:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                fla_rule(*leaves, cu).backward(d_out)
            torch.cuda.synchronize()
        except Exception as e:
            print(f"| {kernels} | {type(e).__name__}: {str(e)[:200]} |")
            continue
        print(f"| {kernels} | {(time.perf_counter() - t0) / repeat * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
