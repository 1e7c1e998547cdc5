"""Resumable prompt order: a fresh seeded permutation per epoch, and a cursor into it."""

from __future__ import annotations

import torch


class PromptOrder:
    """Yields prompt indices without replacement; its whole state is (epoch, position)."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("PromptOrder: the training set is empty")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            step = min(count - len(out), self.size - self.position)
            out.extend(self._order[self.position:self.position + step])
            self.position += step
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(
                f"checkpoint was written for a training set of {int(state['size'])} prompts, "
                f"this run has {self.size}: resume with the same data files"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
