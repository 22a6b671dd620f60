"""A step's plan: which rollouts each rank trains, and how they are split into micro-batches.

Padded micro-batches compute their longest sample times their size; on a GRPO batch, whose completions run
from a few dozen to thousands of tokens, half of that was padding (issue 13: 51% on the 8B config's ragged
bench batch). Packed micro-batches (`MultimodalBatch.pack`) compute only real tokens, so the planner fills
them by tokens: first-fit decreasing by length within `train.micro_batch_tokens` (and
`train.micro_batch_patches` for the vision tower). With several ranks, each rank's share is balanced by
tokens before planning (`exchange_rollouts`): ranks sample their own prompts, and a rank whose completions
ran long would otherwise set the step's pace while the others wait.

Whatever the split, the gradient is the same: the loss is normalised once by the step's global counts
(`StepPlan.total_tokens`, `total_sequences`), and every rank runs as many forward/backward passes as the
busiest (`padding_passes` zero-weight passes), so collectives stay in step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable

from .batch import MultimodalBatch, PackedBatch, plan_micro_batches
from .config import TrainConfig
from .records import Rollout


@dataclass
class StepPlan:
    """Micro-batches of this rank's batch (sample indices), packed or padded, and the step's global counts."""

    micro_batches: list[list[int]]
    packed: bool
    total_tokens: float | None = None  # trained tokens of the whole step, all ranks (None: this batch's own)
    total_sequences: float | None = None  # sequences with a trained token, all ranks
    padding_passes: int = 0  # zero-weight passes that keep this rank in step with the busiest one
    reason: str | None = None  # why the micro-batches are padded although packing was asked for

    def micro_batch(self, batch: MultimodalBatch, indices: list[int]) -> MultimodalBatch | PackedBatch:
        return batch.pack(indices) if self.packed else batch.select(indices)

    @property
    def passes(self) -> list[tuple[list[int], float]]:
        """(sample indices, loss weight) of every forward/backward pass, the padding passes last."""
        return [(g, 1.0) for g in self.micro_batches] + [(self.micro_batches[-1], 0.0)] * self.padding_passes


def pack_micro_batches(
    lengths: list[int], max_tokens: int, patches: list[int] | None = None, max_patches: int | None = None
) -> list[list[int]]:
    """First-fit decreasing: samples, longest first, each into the first micro-batch with room for its tokens
    (and vision patches), else into a new one. A sample over a budget on its own gets a micro-batch of its
    own. Each micro-batch lists its samples in batch order; micro-batches in the order they were opened."""
    patches = patches or [0] * len(lengths)
    bins: list[list[int]] = []
    tokens: list[int] = []
    vision: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in range(len(bins)):
            if tokens[b] + lengths[i] <= max_tokens and (max_patches is None
                                                         or vision[b] + patches[i] <= max_patches):
                break
        else:
            b = len(bins)
            bins.append([])
            tokens.append(0)
            vision.append(0)
        bins[b].append(i)
        tokens[b] += lengths[i]
        vision[b] += patches[i]
    return [sorted(b) for b in bins]


def micro_batches(batch: MultimodalBatch, train: TrainConfig, packed: bool) -> list[list[int]]:
    """The micro-batches of `batch` under `train`'s budgets."""
    lengths = batch.lengths
    if packed:
        budget = train.micro_batch_tokens or train.micro_batch_size * max(lengths)
        return pack_micro_batches(lengths, budget, batch.vision_patches_per_sample, train.micro_batch_patches)
    return plan_micro_batches(lengths, train.micro_batch_size, train.micro_batch_tokens,
                              batch.vision_patches_per_sample,
                              train.micro_batch_patches)


def plan_step(
    trained: list[Rollout],
    fallback: list[Rollout],
    build_batch: Callable[[list[Rollout]], MultimodalBatch],
    train: TrainConfig,
    unavailable: str | None = None,
    world: int = 1,
    reduce: Callable[[list[float], str], list[float]] | None = None,
) -> tuple[MultimodalBatch, StepPlan]:
    """This rank's batch and plan for one optimizer step.

    `trained`: this rank's rollouts that enter the loss; `fallback`: rollouts to run zero-weight passes over
    when none do (a rank must still take part in the collectives); `train`: the budgets; `unavailable`:
    why the model cannot pack (None: it can); `reduce(values, "sum" | "max")` over ranks (None: one rank).
    With packing and several ranks, the rollouts are first balanced across ranks by tokens.

    Packing asked for but unavailable: the plan is padded and says why (`StepPlan.reason`), and a warning is
    issued at the caller's line, which Python's default filter shows once per line (no state kept here)."""
    packed = train.packing and unavailable is None
    if train.packing and unavailable is not None:
        warnings.warn(unavailable, stacklevel=2)
    if packed and world > 1:
        trained = exchange_rollouts(trained, world)
    batch = build_batch(trained or fallback)
    if not trained:
        batch.loss_mask.zero_()
    groups = micro_batches(batch, train, packed)
    counts = [float(batch.num_loss_tokens), float((batch.loss_mask.sum(-1) > 0).sum())]
    most = float(len(groups))
    if reduce is not None:
        counts, (most,) = reduce(counts, "sum"), reduce([most], "max")
    plan = StepPlan(groups, packed, counts[0], counts[1], int(most) - len(groups),
                    None if packed or not train.packing else unavailable)
    return batch, plan


# --- ranks --------------------------------------------------------------------------------------------------
def balance_ranks(lengths: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Which samples each rank trains, as (rank that holds it, index there), given every rank's sample
    lengths: samples move from the rank with the most tokens to the one with the fewest while a move narrows
    their gap (each move lowers the sum of squared loads, so it ends), the one closest to half the gap first.
    Few samples move (each move ships a rollout, pixels included); the result is the same on every rank."""
    world = len(lengths)
    owner = {(r, i): r for r, ls in enumerate(lengths) for i in range(len(ls))}
    load = [sum(ls) for ls in lengths]
    for _ in range(len(owner)):
        heavy = max(range(world), key=lambda r: (load[r], -r))
        light = min(range(world), key=lambda r: (load[r], r))
        gap = load[heavy] - load[light]
        movable = [s for s, r in owner.items() if r == heavy and 0 < lengths[s[0]][s[1]] < gap]
        if not movable:
            break
        s = min(movable, key=lambda s: (abs(gap - 2 * lengths[s[0]][s[1]]), s))
        owner[s] = light
        load[heavy] -= lengths[s[0]][s[1]]
        load[light] += lengths[s[0]][s[1]]
    return [sorted(s for s, r in owner.items() if r == rank) for rank in range(world)]


def rollout_tokens(r: Rollout) -> int:
    return len(r.prompt.input_ids) + len(r.completion_ids)


def exchange_rollouts(rollouts: list[Rollout], world: int, gather: Callable | None = None) -> list[Rollout]:
    """This rank's share of every rank's `rollouts` after `balance_ranks`: its own that stay, then those sent
    to it, in (rank, index) order. Two object all-gathers (lengths, then only the rollouts that move, without
    their PIL images and dataset samples); the second is skipped on every rank when nothing moves."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if gather is None:
        def gather(obj):
            out = [None] * world
            dist.all_gather_object(out, obj)
            return out

    assignment = balance_ranks(gather([rollout_tokens(r) for r in rollouts]))
    moving = [(src, i) for dst, share in enumerate(assignment) for src, i in share if src != dst]
    if not moving:
        return rollouts
    sent = gather({i: _portable(rollouts[i]) for src, i in moving if src == rank})
    return [rollouts[i] if src == rank else sent[src][i] for src, i in assignment[rank]]


def _portable(r: Rollout) -> Rollout:
    """What another rank needs to train on `r` (ids, logprobs, pixels, advantage), not what it was made
    from."""
    return replace(r, prompt=replace(r.prompt, images=[], videos=[], messages=[]), sample=None, env_images=[])


# --- what check-batch reports -------------------------------------------------------------------------------
def micro_batch_tokens(lengths: list[int], groups: list[list[int]], packed: bool) -> list[int]:
    """Tokens each micro-batch computes: the sum of its lengths packed, size x longest padded."""
    return [sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g) for g in groups]


def packing_report(batch: MultimodalBatch, plan: StepPlan, train: TrainConfig) -> dict:
    """The packing of one batch, for `check-batch`: padding fraction of today's padded plan (in order, within
    `train`'s budgets) and of `plan`, and the tokens each of `plan`'s micro-batches computes."""
    lengths = batch.lengths
    real = sum(lengths)
    before = micro_batch_tokens(lengths, micro_batches(batch, train, packed=False), packed=False)
    after = micro_batch_tokens(lengths, plan.micro_batches, plan.packed)
    return {
        "packed": plan.packed,
        "reason": plan.reason,
        "real_tokens": real,
        "padding_before": 1 - real / sum(before),
        "padding_after": 1 - real / sum(after),
        "micro_batches_before": len(before),
        "micro_batches": len(after),
        "tokens_per_micro_batch": after,
    }
