"""The order in which a run visits its prompts: a seeded shuffle per epoch, shared out among ranks.

Rank r of `world` takes global positions r, r + world, r + 2*world, ... of the epoch-by-epoch order, so two
ranks together see exactly the prompts one rank would, and each rank resumes from its own count (`index`).
"""

from __future__ import annotations

import random

from ..sample import Sample


class PromptStream:
    def __init__(self, samples: list[Sample], seed: int, rank: int = 0, world: int = 1, index: int = 0):
        if not samples:
            raise ValueError("PromptStream needs at least one sample")
        self.samples, self.seed, self.rank, self.world, self.index = samples, seed, rank, world, index
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.samples)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}  # keep one epoch's order
        return self._orders[epoch]

    def take(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.rank + self.index * self.world, len(self.samples))
            out.append(self.samples[self._order(epoch)[pos]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"index": self.index}

    def restore(self, state: dict) -> None:
        """Back to a position `state()` gave: the prompts since then come again."""
        self.index = state["index"]
