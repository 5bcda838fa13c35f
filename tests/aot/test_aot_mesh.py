"""`plan --compile` on a mesh: the run's train step compiled deviceless for several GPUs of one kind
(`aot.compile_step_mesh`, the CUDA plugin's topology ``1x1xN``), placed by `jqlora.parallel`'s partition rules.

A small Llama shape (hidden 256, 2 layers) keeps each compile to seconds. Invariants, per device, with the rows per
device fixed: a data axis replicates the weights, so the arguments are byte for byte the single device's and the
gradients are all-reduced; an fsdp axis shards the frozen weights, so the arguments shrink by at least a third of the
quantized weights (the kernels and their scales, half of each on each of 2 devices) and the step all-gathers them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from jqlora import plan
from jqlora.config import Config
from jqlora.models import ModelConfig
from jqlora.planning import aot, weight_bytes

GPU = "h100-sxm"
HF = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
SHAPE = ModelConfig.from_hf(HF)
ROWS, SEQ = 2, 128  # rows per device


def _cfg(devices_on_rows: int):
    c = Config()
    return dataclasses.replace(c, data=dataclasses.replace(c.data, max_length=SEQ),
                               train=dataclasses.replace(c.train, batch_size=ROWS * devices_on_rows, remat="full"),
                               model=dataclasses.replace(c.model, dtype="bfloat16"))


@pytest.fixture(scope="module")
def steps():
    return {axes: aot.compiled_mesh(SHAPE, _cfg(axes[0] * axes[1]), GPU, "full", *axes)
            for axes in ((1, 1, 1), (2, 1, 1), (1, 2, 1))}


def test_data_axis_replicates_weights_and_all_reduces(steps):
    one, data = steps[(1, 1, 1)], steps[(2, 1, 1)]
    assert len(aot.gpu_devices(GPU, 2)) == 2
    assert data.memory["argument"] == one.memory["argument"]
    assert "all-reduce" in data.hlo() and "all-reduce" not in one.hlo()


def test_fsdp_axis_shards_weights_and_all_gathers(steps):
    one, fsdp = steps[(1, 1, 1)], steps[(1, 2, 1)]
    quantized = weight_bytes(SHAPE, quant="nf4", double_quant=True, block_size=64, dtype_bytes=2)["quantized"]
    saved = one.memory["argument"] - fsdp.memory["argument"]
    assert quantized / 3 <= saved < one.memory["argument"] / 2, (saved, quantized, one.memory)
    assert "all-gather" in fsdp.hlo()


def test_plan_compile_takes_a_mesh(capsys):
    args = ["--model-config", json.dumps(HF), "--seq", str(SEQ), "--batch", str(ROWS), "--remat", "full",
            "--compile", "--gpu", GPU, "--fsdp", "2"]
    assert plan.main(args) == 0
    out = capsys.readouterr().out
    assert "compiled for 2 x h100-sxm (data 1 x fsdp 2 x tensor 1), per device" in out
    # a mesh is compiled for a named GPU only
    assert plan.main([a for a in args if a not in ("--gpu", GPU)]) == 2
    assert "give --gpu" in capsys.readouterr().err
