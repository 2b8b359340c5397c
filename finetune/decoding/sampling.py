"""Drawing the next token from a row's logits as its generation settings say (temperature, top-k, top-p)."""

from __future__ import annotations

import torch

from ..generation import GenerationSettings


def sample(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    """One token drawn from ``logits`` (one row's) as ``settings`` say: temperature, then top-k, then top-p."""
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > settings.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # Checked here, on the host: on a GPU, multinomial over a NaN distribution is a device-side assert that ruins
    # the whole process (every batch after it), where this is an error for this one row.
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"the sampling distribution is not finite (temperature {settings.temperature:g} for these "
                         "logits)")
    return torch.multinomial(probs, 1, generator=generator)[0]
