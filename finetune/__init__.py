"""finetune: LoRA fine-tuning with an immutable, versioned local model registry."""

from .registry import Model, Registry, Version

__version__ = "0.1.0"
__all__ = ["Model", "Registry", "Version", "__version__"]
