"""`train.checkpoint_fraction = "auto"`: the least recomputation whose peak fits the memory the run really has.

Recomputing a decoder layer's activations in the backward pass (activation checkpointing) trades compute for
memory: a layer that is not recomputed keeps its activations from its forward to its backward. On one H200 (8B,
8 x 1041 tokens, compiled layers) recomputing 75% of the layers ran the update in 0.823 s, 25% in 0.719 s and
none in 0.667 s, so the best fraction is the smallest that fits, and what fits depends on the GPU, the sharding,
LoRA, the optimizer state and the micro-batch: it is measured, not guessed.

- At the first update, the step's largest micro-batch runs forward and backward (its gradients then dropped)
  three times: every layer recomputed, half of them, none (stopping at the first that runs out of memory; with
  several ranks, only the first two, since one rank's error would leave the others waiting in a collective).
  The peak is a convex function of the number of layers kept (the largest of a peak the kept activations do not
  reach and one that grows with them: on an H200, 8B, +0.4 GiB for the first 9 layers kept, +9 GiB for the last
  9), so the line between two measurements never predicts less than the real peak between them.
- What is not allocated yet is added: AdamW's state (its first step has not run) and a margin for fragmentation
  and for longer micro-batches later.
- The fraction is the smallest whose predicted peak fits the device's memory (or the share a process was capped
  at, `torch.cuda.set_per_process_memory_fraction`). Under DDP/FSDP2 the ranks take the largest of their choices:
  one fraction for all.
- An out-of-memory error in a later step steps the fraction up by a quarter of the layers (never past all of them)
  and redoes that step's update from zeroed gradients (a backward that died midway has summed some gradients and
  not others); it is said once. At all layers recomputed, the error is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MARGIN = 0.06  # of the budget, kept free: allocator fragmentation, a longer micro-batch than the first step's
GIB = 1024**3


@dataclass
class Choice:
    fraction: float
    predicted_peak: int  # bytes, optimizer state included
    budget: int  # bytes the run may use
    per_layer: int  # bytes one layer's kept activations add

    def describe(self, layers: int) -> str:
        kept = layers - round(self.fraction * layers)
        return (f"activation checkpointing: {self.fraction:.0%} of {layers} layers recomputed ({kept} keep their "
                f"activations, {self.per_layer / GIB:.2f} GiB each); predicted peak {self.predicted_peak / GIB:.1f} "
                f"of {self.budget / GIB:.1f} GiB")


def levels(layers: int) -> list[float]:
    """The fractions `set_checkpointing` can realise: k / layers layers recomputed."""
    return [k / layers for k in range(layers + 1)]


def choose(layers: int, peaks: dict[int, int], budget: int, extra: int = 0, margin: float = MARGIN) -> Choice:
    """The smallest fraction whose predicted peak (+ `extra`, memory allocated later) fits `budget` less the
    margin. `peaks`: measured peak by number of layers keeping their activations (0: every layer recomputed).
    Between two measurements the prediction is the line through them, which the convex peak never exceeds; no
    fraction keeping more layers than measured is chosen. All layers recomputed when even that does not fit (the
    run may still fit: it is said)."""
    points = sorted(peaks.items())
    limit = int(budget * (1 - margin))
    slope = 0
    for f in levels(layers):
        kept = layers - round(f * layers)
        if kept > points[-1][0]:
            continue
        (k0, p0), (k1, p1) = next(((a, b) for a, b in zip(points, points[1:]) if a[0] <= kept <= b[0]),
                                  (points[0], points[0]))
        slope = (p1 - p0) // max(k1 - k0, 1)
        peak = p0 + (kept - k0) * slope + extra
        if peak <= limit:
            return Choice(f, peak, budget, slope)
    return Choice(1.0, points[0][1] + extra, budget, slope)


def step_up(fraction: float, layers: int) -> float:
    """The next fraction after an out-of-memory error: a quarter of the layers more recomputed (at least one)."""
    step = max(1, round(layers / 4))
    return min(1.0, (round(fraction * layers) + step) / layers)


def optimizer_state_bytes(params: list[torch.Tensor]) -> int:
    """What AdamW allocates at its first step: two moments per trainable parameter, in the parameter's dtype (the
    local shard's under FSDP2)."""
    total = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += 2 * local.numel() * local.element_size()
    return total


def device_budget(device: torch.device) -> int:
    """Bytes this process may allocate on `device`: its memory, times the share it was capped at."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # (torch >= 2.12)
    return int(total * (get(index) if get is not None else 1.0))


class AutoCheckpointing:
    """A run's `checkpoint_fraction = "auto"`: decided at its first update, stepped up after an OOM.

    `set_fraction(f)` applies a fraction to the model; `layers` is its number of decoder layers. On the CPU
    there is no device memory to measure or run out of: every layer is recomputed, as the default fraction 1."""

    def __init__(self, set_fraction, layers: int, device: torch.device):
        self.set_fraction, self.layers, self.device = set_fraction, layers, device
        self.fraction: float | None = None
        self.choice: Choice | None = None
        self.stepped_up = False

    def decide(self, probe, params: list[torch.Tensor], optimizer_has_state: bool, agree,
               distributed: bool = False) -> str:
        """Run `probe()` (the step's largest micro-batch, forward and backward) with every layer recomputed, half
        and none (see the module docstring), choose, and agree on the fraction with the other ranks
        (`agree(values, "max")`). Returns the sentence to print."""
        if self.device.type != "cuda":
            self._apply(1.0)
            return "activation checkpointing: auto on the CPU recomputes every layer (no device memory to measure)"
        peaks: dict[int, int] = {}  # layers kept -> measured peak
        for f in (1.0, 0.5) if distributed else (1.0, 0.5, 0.0):
            self.set_fraction(f)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                probe()
            except torch.OutOfMemoryError:  # keeping this many layers' activations does not fit at all
                torch.cuda.empty_cache()
                break
            torch.cuda.synchronize(self.device)
            peaks[self.layers - round(f * self.layers)] = torch.cuda.max_memory_allocated(self.device)
        if not peaks:  # nothing to choose from: the step will raise the same error, this says what to change
            self._apply(1.0)
            return ("activation checkpointing: the step's largest micro-batch runs out of GPU memory even with every "
                    "layer recomputed; lower train.micro_batch_tokens (or train.micro_batch_size)")
        free, total = torch.cuda.mem_get_info(self.device)
        outside = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, NCCL: not PyTorch's
        budget = device_budget(self.device) - max(outside, 0)
        extra = 0 if optimizer_has_state else optimizer_state_bytes(params)
        choice = choose(self.layers, peaks, budget, extra)
        fraction = float(agree([choice.fraction], "max")[0])
        self.choice = Choice(fraction, choice.predicted_peak, budget, choice.per_layer)
        self._apply(fraction)
        return self.choice.describe(self.layers) + (" (the largest of the ranks' choices)" if fraction != choice.fraction
                                                    else "")

    def step_up(self) -> str | None:
        """After an out-of-memory error: the next fraction, or None when every layer is recomputed already."""
        if self.fraction is None or self.fraction >= 1.0:
            return None
        before = self.fraction
        self._apply(step_up(before, self.layers))
        note = "" if self.stepped_up else (f"out of GPU memory with {before:.0%} of the layers recomputed: now "
                                          f"{self.fraction:.0%}, and the step's update redone")
        self.stepped_up = True
        return note

    def _apply(self, fraction: float) -> None:
        self.fraction = fraction
        self.set_fraction(fraction)
