"""jqlora: QLoRA fine-tuning in JAX/Flax with bitsandbytes-compatible NF4 weights and peft-compatible adapters."""

__version__ = "0.1.0"
