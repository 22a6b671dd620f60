"""The order in which a run visits its prompts: a seeded shuffle per epoch, resumable from (epoch, pos)."""

from __future__ import annotations

import random

from .dataset import Sample


class PromptStream:
    def __init__(self, samples: list[Sample], seed: int, epoch: int = 0, pos: int = 0):
        if not samples:
            raise ValueError("PromptStream needs at least one sample")
        self.samples = samples
        self.seed = seed
        self.epoch = epoch
        self.pos = pos
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[Sample]:
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation(self.epoch)
            out.append(self.samples[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}
