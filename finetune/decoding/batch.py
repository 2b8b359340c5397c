"""A batch of rows decoding together (:class:`Batch`: their KV cache, masks, positions and last tokens; rows
leave it and newcomers' caches join it, left-padded), and the model's name for its cache argument.

Used by the engine (:mod:`.engine`), which owns the rows; here only their tensors are kept in step.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


class Batch:
    """The rows decoding together and their KV cache, attention masks, next positions and last tokens."""

    def __init__(self, rows: list[Any], cache: Any, mask: torch.Tensor, next_pos: torch.Tensor):
        self.rows, self.cache, self.mask, self.next_pos = rows, cache, mask, next_pos
        self.last = torch.zeros(len(rows), dtype=torch.long, device=mask.device)

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos, self.last = self.mask[index], self.next_pos[index], self.last[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are all padding
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]

    def join(self, other: Batch) -> Batch:
        """Stack ``other``'s rows under these: the shorter caches and masks are left-padded to one length."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.last = torch.cat([self.last, other.last])
        self.rows = self.rows + other.rows
        return self


def cache_argument(base: Any) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` in newer transformers, else the old one."""
    model = base.model.get_base_model() if hasattr(base.model, "get_base_model") else base.model
    return _cache_argument_of(type(model))


@functools.cache
def _cache_argument_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence axis (the last for a mask, the one before it for cached keys and values)."""
    axis = 1 if t.dim() == 2 else t.dim() - 2
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=axis)
