"""LoRA over a frozen (4-bit or float) kernel: the settings (`spec`: which modules, which rank / alpha, per-layer
patterns), the layer (`layer`: `LoraLinear`, its quantized matmul and its variables), DoRA's math (`dora`), the
initializations beyond peft's default (`initialize`: gaussian, PiSSA, LoftQ) and the cut of a model into its LoRA
parameters and the rest (`split`)."""

from jqlora.lora import dora, initialize
from jqlora.lora.layer import (COMPUTE_DTYPES, FROZEN_MATMUL, QUANTS, Frozen, LoraLinear, QuantData, QuantSpec,
                               compute_dtype, count_params, lora_a_init, quantized_matmul, set_layer_values,
                               tiled_quantized_matmul)
from jqlora.lora.spec import (ADAPTABLE_MODULES, FUSED_MODULES, HEAD_MODULES, LINEAR_MODULES, LoraConfig, LoraError,
                              LoraSpec, check_rank_fits, match_pattern)
from jqlora.lora.split import NoLoraError, SplitModel

__all__ = [
    "ADAPTABLE_MODULES", "COMPUTE_DTYPES", "FROZEN_MATMUL", "FUSED_MODULES", "HEAD_MODULES", "LINEAR_MODULES", "QUANTS",
    "Frozen", "LoraConfig", "LoraError", "LoraLinear", "LoraSpec", "NoLoraError", "QuantData", "QuantSpec",
    "SplitModel", "check_rank_fits", "compute_dtype", "count_params", "dora", "initialize", "lora_a_init",
    "match_pattern", "quantized_matmul", "set_layer_values", "tiled_quantized_matmul",
]
