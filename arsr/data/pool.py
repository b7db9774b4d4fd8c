"""Real-ESRGAN's training-pair pool: degraded pairs are mixed across batches.

Several degradation choices are made once per batch (resize factor and mode, final order);
the pool breaks that correlation. While it fills, batches pass through unchanged; once full,
each new batch is swapped for ``batch_size`` random pairs from the shuffled pool.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PairPool:
    """Args: size: pairs held (Real-ESRGAN x4plus: 180 with batch 12); a multiple of the batch size."""

    def __init__(self, size: int):
        self.size, self.ptr = size, 0
        self.store: dict[str, Tensor | list] = {}

    def _fields(self, batch: dict, b: int) -> list[str]:
        return [k for k, v in batch.items()
                if (isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b) or (isinstance(v, list) and len(v) == b)]

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        b = len(batch["hr"])
        if self.size % b:
            raise ValueError(f"pool_size {self.size} is not a multiple of the batch size {b}")
        fields = self._fields(batch, b)
        for k, v in self.store.items():  # restored from a checkpoint on the CPU
            if isinstance(v, Tensor) and v.device != batch[k].device:
                self.store[k] = v.to(batch[k].device)
        if not self.store:
            self.store = {k: (batch[k].new_empty((self.size, *batch[k].shape[1:])) if isinstance(batch[k], Tensor)
                              else [None] * self.size) for k in fields}
        if self.ptr < self.size:  # filling: keep a copy, train on the batch as it is
            for k in fields:
                self._put(k, slice(self.ptr, self.ptr + b), batch[k])
            self.ptr += b
            return batch
        order = torch.randperm(self.size, generator=generator, device="cpu")
        out = dict(batch)
        for k in fields:
            store = self.store[k]
            shuffled = store[order.to(store.device)] if isinstance(store, Tensor) else [store[i] for i in order.tolist()]
            out[k] = shuffled[:b].clone() if isinstance(shuffled, Tensor) else shuffled[:b]
            self.store[k] = shuffled
            self._put(k, slice(0, b), batch[k])
        return out

    def _put(self, k: str, where: slice, value) -> None:
        if isinstance(self.store[k], Tensor):
            self.store[k][where] = value
        else:
            self.store[k][where] = list(value)

    def state_dict(self) -> dict:
        store = {k: v.cpu() if isinstance(v, Tensor) else list(v) for k, v in self.store.items()}
        return {"ptr": self.ptr, "store": store}

    def load_state_dict(self, state: dict) -> None:
        self.ptr, self.store = state["ptr"], dict(state["store"])
