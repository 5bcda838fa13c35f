"""Pure math of the frozen base: NF4 / FP4 codebooks, blockwise (de)quantization with double quantization of the
block scales (`blockwise`), and bitsandbytes' serialized 4-bit state (`bnb`). Arrays in, arrays out: no files, no
Flax. The math and where it differs from bitsandbytes are in `jqlora.quant.blockwise`'s docstring."""

from jqlora.quant.blockwise import (BLOCK_SIZES, CODEBOOKS, DTYPES, NESTED_BLOCK_SIZE, QUANT_TYPES, QuantizedTensor,
                                    bits_per_parameter, block_absmax, codebook, dequantize, dequantize_block,
                                    dequantize_rows, double_quantize, quantize, stack)
from jqlora.quant.bnb import from_bnb, to_bnb, to_numpy
from jqlora.quant.dynamic import OPTIMIZER_BLOCK, dequantize_dynamic, dynamic_map, quantize_dynamic

__all__ = ["BLOCK_SIZES", "CODEBOOKS", "DTYPES", "NESTED_BLOCK_SIZE", "QUANT_TYPES", "QuantizedTensor",
           "OPTIMIZER_BLOCK", "bits_per_parameter", "block_absmax", "codebook", "dequantize", "dequantize_block",
           "dequantize_dynamic", "dequantize_rows", "double_quantize", "dynamic_map", "from_bnb", "quantize",
           "quantize_dynamic", "stack", "to_bnb", "to_numpy"]
