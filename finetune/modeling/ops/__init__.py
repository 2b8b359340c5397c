"""Exact rewrites of a model's training arithmetic: fewer passes over activations, fewer copies kept.

Each rewrite computes what peft and transformers compute (tests compare logits and gradients with the
unrewritten model) and applies only where it recognises the module; anything else keeps its own code.
``lora`` (fused LoRA linear), ``norms`` (RMSNorm), ``mlp`` (gated MLP), ``attention`` (packed causal
attention), ``loss`` (output layer fused with the cross-entropy).
"""

from __future__ import annotations

from typing import Any


def same_code(function: Any, reference: Any) -> bool:
    """Whether ``function`` is ``reference``'s code (a copy in another model family counts), by its bytecode."""
    code, ref = getattr(function, "__code__", None), reference.__code__
    return (code is not None and code.co_code == ref.co_code and code.co_consts == ref.co_consts
            and code.co_names == ref.co_names)


