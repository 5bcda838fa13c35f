"""`python -m jqlora.plan --mode min` and `memory_plan(memory="min")` (train.memory=min, issue 25): the embedding and
lm_head rows follow the mode by exactly the bytes of the layout, computed here from the shapes alone; one table
when tied; train.memory's config checks are one line."""

import math

import pytest

from jqlora import plan
from jqlora import planning as M
from jqlora.config import ConfigError, load_config


def _nf4_dq_bytes(n: int, block: int = 64) -> int:
    """bitsandbytes' NF4 + double-quant layout of n values: n/2 code bytes, one 8-bit scale a block, a float32
    nested scale per 256 blocks and one float32 offset."""
    blocks = math.ceil(n / block)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.mark.parametrize("name", ["llama3-8b", "gemma2-9b"])  # untied (2 tables), tied (1)
def test_min_rows_smaller_by_the_layout_bytes(name):
    shape = M.BUILTIN[name]
    V, D = shape.vocab_size, shape.hidden_size
    tables = 1 if shape.tie_word_embeddings else 2
    default = M.memory_plan(shape, seq=2048, batch=1, remat="full").rows
    # (the optimizer state held as the default's: min's own 8-bit moments are train.optimizer_state's test)
    low = M.memory_plan(shape, seq=2048, batch=1, remat="full", memory="min", optimizer_state="float32").rows
    weights = M.weights_row("bfloat16")
    assert default[weights] - low[weights] == tables * (V * D * 2 - _nf4_dq_bytes(V * D))
    ce = "cross-entropy chunk + final hidden"
    R = min(4096, V)  # one block of vocabulary rows: logits and gradient [1024, R] float32, the rows in bf16 twice
    assert default[ce] - low[ce] == 2 * 1024 * V * 4 - (2 * 1024 * R * 4 + 2 * R * D * 2)
    work = "layer working set (recomputed)"  # one layer's kernels: bf16, or their 4-bit codes + two 16 MiB tiles
    layer = M.linear_shapes(shape).values()
    assert default[work] - low[work] == sum(O * I * 2 for O, I in layer) - (
        sum(_nf4_dq_bytes(O * I) for O, I in layer) + 2 * 16 * 2**20)
    # min takes the residual checkpoints to host memory (as train.offload_residual), byte for byte
    residual = "residual stream checkpoints"
    host = M.memory_plan(shape, seq=2048, batch=1, remat="full", memory="min", optimizer_state="float32").host_rows
    assert residual not in low and host[residual] == default[residual] == shape.num_hidden_layers * 2048 * D * 2
    assert {k: v for k, v in default.items() if k not in (weights, ce, work, residual)} == \
        {k: v for k, v in low.items() if k not in (weights, ce, work)}


def test_plan_cli_mode(capsys):
    assert plan.main(["--model", "llama3-8b", "--seq", "2048", "--mode", "min"]) == 0
    out = capsys.readouterr().out
    assert "memory=min" in out.splitlines()[0]
    shape = M.BUILTIN["llama3-8b"]
    want = M.memory_plan(shape, seq=2048, batch=1, remat="full", memory="min", name="Llama-3-8B").total
    assert f"{want / 1e9:.2f} GB" in next(line for line in out.splitlines() if line.startswith("total per device"))
    assert plan.main(["--model", "llama3-8b", "--mode", "min", "--remat", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jqlora.plan: --mode min takes --remat full (or offload), not none"]


@pytest.mark.parametrize("overrides, says", [
    (["train.memory=low"], "train.memory='low' must be one of default, min"),
    (["train.memory=min", "train.remat=none"], "train.memory='min' takes train.remat=full (or offload), not none"),
])
def test_memory_config_errors(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert says in str(e.value) and len(str(e.value).splitlines()) == 1
    assert load_config(None, ["train.memory=min"]).train.memory == "min"
