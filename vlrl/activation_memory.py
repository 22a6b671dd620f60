"""`train.checkpoint_fraction = "auto"`: the least recomputation whose peak fits the memory the run really has.

Recomputing a decoder layer's activations in the backward pass (activation checkpointing) trades compute for
memory: a layer that is not recomputed keeps its activations from its forward to its backward. On one H200 (8B,
8 x 1041 tokens, compiled layers) recomputing 75% of the layers ran the update in 0.823 s, 25% in 0.719 s and
none in 0.667 s, so the best fraction is the smallest that fits, and what fits depends on the GPU, the sharding,
LoRA, the optimizer state and the micro-batch: it is measured, not guessed.

- At the first update, the step's largest micro-batch runs forward and backward (with zero weight: the gradient
  is unchanged) twice: every layer recomputed, and half of them. Each layer kept adds the same activations, so the
  two peaks give the peak of any fraction (a line in the number of layers kept).
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


def choose(layers: int, peak_all: int, peak_half: int, kept_half: int, budget: int, extra: int = 0,
           margin: float = MARGIN) -> Choice:
    """The smallest fraction whose predicted peak (+ `extra`, memory allocated later) fits `budget` less the
    margin. `peak_all`: the measured peak with every layer recomputed; `peak_half`: with `kept_half` layers keeping
    their activations. All layers recomputed when even that does not fit (the run may still fit: it is said)."""
    per_layer = max(0, (peak_half - peak_all) // max(kept_half, 1))
    limit = int(budget * (1 - margin))
    for f in levels(layers):
        kept = layers - round(f * layers)
        peak = peak_all + kept * per_layer + extra
        if peak <= limit:
            return Choice(f, peak, budget, per_layer)
    return Choice(1.0, peak_all + extra, budget, per_layer)


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

    def decide(self, probe, params: list[torch.Tensor], optimizer_has_state: bool, agree) -> str:
        """Run `probe()` (the step's largest micro-batch, forward and backward) with every layer recomputed and
        with half of them, choose, and agree on the fraction with the other ranks (`agree(values, "max")`).
        Returns the sentence to print."""
        if self.device.type != "cuda":
            self._apply(1.0)
            return "activation checkpointing: auto on the CPU recomputes every layer (no device memory to measure)"
        half = 0.5
        peaks = []
        for f in (1.0, half):
            self.set_fraction(f)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            probe()
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device))
        free, total = torch.cuda.mem_get_info(self.device)
        outside = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, NCCL: not PyTorch's
        budget = device_budget(self.device) - max(outside, 0)
        extra = 0 if optimizer_has_state else optimizer_state_bytes(params)
        kept_half = self.layers - round(half * self.layers)
        choice = choose(self.layers, peaks[0], peaks[1], kept_half, budget, extra)
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
