"""How unequal the ranks' work is on ragged GRPO steps: each rank keeping its own rollouts (sample-count
balance: every rank trains as many rollouts as it sampled) against the token-balanced planner
(`vlrl.planner.balance_ranks`, what `train.packing` runs with several ranks). CPU only: it counts tokens, it
times nothing.

Per rank, per step, the ragged batch of `bench/ragged.py` (8 prompts x groups of 8, each prompt 100 text
tokens + one 448x448 image, completions log-normal, median 400, sigma 0.8, clipped to 16..2048), seeded by
step and rank: the same amount of work per GPU as the issue asks. That batch draws every completion
independently; real groups are not independent (a hard prompt makes all its rollouts long), so a second set of
rows draws half the log-variance per prompt (sigma 0.8/sqrt 2 for the prompt, the same for each rollout around
it: the same spread of lengths overall, lengths correlated within a group). For 2, 4 and 8 ranks over
`--steps` steps:
- busiest/mean: the busiest rank's tokens over the mean rank's (1.00 = perfectly even), mean and worst step;
- wait: the share of the step the other ranks idle, on average, waiting for the busiest (time taken as
  proportional to tokens: the update is compute-bound at these sizes);
- moved: rollouts shipped between ranks per step (the planner's cost: one object all-gather of them);
- pad passes: each rank packs its share (first-fit decreasing within 16384 tokens) and runs as many passes as
  the busiest rank, the missing ones zero-weight (`StepPlan.padding_passes`); their count per step and the
  tokens they compute over the useful ones (work the token count above does not see).

    python bench/rank_balance.py [--steps 200]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from ragged import RaggedSpec, completion_lengths

from vlrl.planner import balance_ranks, pack_micro_batches


def rank_lengths(spec: RaggedSpec, world: int, step: int, grouped: bool) -> list[list[int]]:
    """Every rank's sample lengths (prompt with its image tokens + completion) for one step; `grouped`: half
    the completions' log-variance shared by a prompt's group."""
    prompt = spec.prompt_text + (spec.image_side // 32) ** 2 + 2  # text, image pads, vision start and end
    n = spec.prompts * spec.group
    out = []
    for rank in range(world):
        seed = 10_000 * step + rank
        if not grouped:
            out.append([prompt + c for c in completion_lengths(spec, n, seed)])
            continue
        g = torch.Generator().manual_seed(seed)
        z = (torch.randn(spec.prompts, 1, generator=g, dtype=torch.float64).expand(-1, spec.group)
             + torch.randn(spec.prompts, spec.group, generator=g, dtype=torch.float64)) / math.sqrt(2)
        out.append([prompt + int(min(max(round(spec.median * math.exp(spec.sigma * float(v))), spec.shortest),
                                     spec.longest)) for v in z.flatten()])
    return out


def imbalance(loads: list[int]) -> tuple[float, float]:
    """(busiest over mean, mean share of the step the other ranks wait)."""
    most = max(loads)
    return most / statistics.mean(loads), statistics.mean((most - x) / most for x in loads)


def padding_passes(spec: RaggedSpec, shares: list[list[int]]) -> tuple[int, float]:
    """(zero-weight passes over all ranks, their tokens over the useful ones) when each rank packs its
    share."""
    bins = [pack_micro_batches(ls, spec.micro_batch_tokens) for ls in shares]
    most = max(len(b) for b in bins)
    extra = sum((most - len(b)) * sum(ls[i] for i in b[-1]) for ls, b in zip(shares, bins))
    return sum(most - len(b) for b in bins), extra / sum(map(sum, shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    spec = RaggedSpec()
    header = (f"{'lengths':<12} | {'ranks':>5} | {'planner':<16} | {'busiest/mean':>12} | {'worst step':>10} "
              f"| {'wait':>6} | {'moved':>5} | {'pad passes':>10} | {'+tokens':>7}")
    print(header)
    print("-" * len(header))
    for grouped, world in [(g, w) for g in (False, True) for w in (2, 4, 8)]:
        rows = {"sample counts": [], "token-balanced": []}
        for step in range(args.steps):
            lengths = rank_lengths(spec, world, step, grouped)
            own = [sum(ls) for ls in lengths]
            rows["sample counts"].append((*imbalance(own), 0, *padding_passes(spec, lengths)))
            shares = [[lengths[src][i] for src, i in share] for share in balance_ranks(lengths)]
            moved = sum(src != dst for dst, share in enumerate(balance_ranks(lengths)) for src, _ in share)
            rows["token-balanced"].append((*imbalance([sum(s) for s in shares]), moved,
                                           *padding_passes(spec, shares)))
        for name, r in rows.items():
            ratio, wait, moved, passes, extra = zip(*r)
            print(f"{'per group' if grouped else 'independent':<12} | {world:>5} | {name:<16} | "
                  f"{statistics.mean(ratio):>12.4f} | {max(ratio):>10.4f} | "
                  f"{100 * statistics.mean(wait):>5.2f}% | {statistics.mean(moved):>5.1f} | "
                  f"{statistics.mean(passes):>10.2f} | {100 * statistics.mean(extra):>6.2f}%")


if __name__ == "__main__":
    main()
