"""jqlora: QLoRA fine-tuning in JAX/Flax with bitsandbytes-compatible NF4 weights and peft-compatible adapters."""

import os as _os

# transformers' "PyTorch was not found" banner alarms users of the torch-free install (it is an advisory warning)
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
__all__ = ["load_model"]


def __getattr__(name: str):
    # Lazy, so that `python -m jqlora.convert` and the quantization library do not import Flax up front.
    if name == "load_model":
        from jqlora.adapters import load_model

        return load_model
    raise AttributeError(f"module 'jqlora' has no attribute {name!r}")
