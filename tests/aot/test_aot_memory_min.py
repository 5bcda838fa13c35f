"""train.memory=min in the compiler's own output (deviceless h100-sxm; 2 Llama-3-8B layers, seq 256, a 32k vocabulary
to keep the two compiles short): the arguments shrink by exactly the embedding's and lm_head's bf16 bytes less their NF4 + double-quant
layout (computed here from the shape), and no buffer of the step holds a whole dequantized head, full-vocabulary
logits or a whole dequantized MLP kernel."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from jqlora.config import load_config
from jqlora.planning import BUILTIN, aot

GPU, L, SEQ = "h100-sxm", 2, 256
SHAPE = dataclasses.replace(BUILTIN["llama3-8b"], num_hidden_layers=L, sliding_windows=(None,) * L,
                            vocab_size=32768)


def _nf4_dq_bytes(n: int, block: int = 64) -> int:
    blocks = math.ceil(n / block)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.fixture(scope="module")
def steps():
    out = {}
    for mode in ("default", "min"):
        cfg = load_config("configs/llama3-8b.yaml", ["model.path=/not/needed", f"data.max_length={SEQ}",
                                                     "train.batch_size=1", f"train.memory={mode}",
                                                     "train.optimizer_state=float32"])  # (heads alone)
        out[mode] = aot.compiled(SHAPE, cfg, GPU, "full")
    return out


def test_arguments_shrink_by_the_head_layout_bytes(steps):
    V, D = SHAPE.vocab_size, SHAPE.hidden_size
    saved = 2 * (V * D * 2 - _nf4_dq_bytes(V * D))
    layer_index = 7 * L * 4  # (min: each of the 7 tiled kernels' int32 layer index, stacked over L)
    got = steps["default"].memory["argument"] - steps["min"].memory["argument"]
    assert got == saved - layer_index
    assert steps["min"].peak_bytes < steps["default"].peak_bytes - saved


def test_no_whole_dequantized_head_logits_or_kernel(steps):
    V, D, F = SHAPE.vocab_size, SHAPE.hidden_size, SHAPE.intermediate_size
    text = steps["min"].hlo()
    for shape in (f"bf16[{V},{D}]", f"bf16[{V * D}]", f"f32[{SEQ},{V}]", f"bf16[{F},{D}]", f"bf16[{D},{F}]",
                  f"bf16[{F * D}]"):
        assert not re.search(re.escape(shape) + r"\{", text), shape
    assert re.search(re.escape(f"bf16[{F},{D}]") + r"\{", steps["default"].hlo())  # (the default mode has them)
