"""Activations rebuilt in the backward pass instead of kept.

A normalisation's output is one tensor of the model's width per token, and every linear layer that reads it
(a decoder's query, key and value projections, or its gate and up projections) keeps it for its weight
gradients. Its producer keeps its input anyway, and rebuilding it from that input is one cheap elementwise
pass. So a producer attaches a :class:`Recipe` to its output; a consumer that knows the protocol keeps the
recipe's inputs (which autograd then guards against in-place changes, as for any saved tensor) instead of the
output, and in the backward pass asks the recipe for the value. The value is rebuilt once for all the
consumers that took it, with the producer's own arithmetic, so it is the same bits, and dropped after the
last of them. A consumer that does not know the protocol keeps the output as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_ATTR = "_finetune_recipe"


class Recipe:
    """How to compute a tensor again: ``build(*inputs)``, from tensors its producer keeps anyway."""

    def __init__(self, build: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        self.build, self.inputs = build, inputs
        self._takers = 0
        self._value: torch.Tensor | None = None

    def take(self) -> tuple[torch.Tensor, ...]:
        """Forward: a consumer keeps these (with ``save_for_backward``) in place of the tensor."""
        self._takers += 1
        return self.inputs

    def value(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Backward: the tensor, rebuilt from the consumer's saved ``inputs`` (shared by the consumers that took
        this recipe; read-only for them)."""
        value = self._value if self._value is not None else self.build(*inputs)
        self._takers -= 1
        self._value = value if self._takers > 0 else None  # kept for the next consumer, dropped after the last
        return value


def attach(tensor: torch.Tensor, build: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """Say how ``tensor`` is rebuilt (only while autograd records: no backward pass, nothing to rebuild)."""
    if tensor.requires_grad:
        setattr(tensor, _ATTR, Recipe(build, *inputs))
    return tensor


def recipe(tensor: torch.Tensor) -> Recipe | None:
    """The recipe attached to exactly this tensor object (views and copies of it have none)."""
    return getattr(tensor, _ATTR, None)
