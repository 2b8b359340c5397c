"""finetune: LoRA fine-tuning with an immutable, versioned local model registry."""

from typing import Any

from .registry import Model, Registry, Version

__version__ = "0.1.0"
__all__ = ["Model", "Registry", "Version", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # `load` needs torch, transformers and peft; importing them on `import finetune` would make every CLI call
    # (and every registry-only user) pay seconds for nothing.
    if name == "load":
        from .inference import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
