"""`plan --max-seq --compile` (jqlora.planning.max_seq) against deviceless h100-sxm compiles of a 2-layer, hidden-256
Llama (the Python 3.12 venv with jax[cuda13]), with the long-context savings on (MLP chunks of 512 tokens, the
residual offloaded):

- the search's answer is the boundary: at it the compiled peak is within the budget, one step of the search's fine
  grid (512 tokens) above it the compiled peak is over (the budget is the compiled peak of a length between grid
  points, so the boundary is not trivially a grid point's own peak);
- the offloaded residual is in host memory: the compiler's host temporaries hold exactly the L layer inputs
  [L, B, S, D] in bf16.
One module-wide probe, about 5 compiles (the budget's and those of the search, interpolating as the CLI does).
"""

from __future__ import annotations

import dataclasses as dc

import pytest

from jqlora.config import Config
from jqlora.models import ModelConfig
from jqlora.planning import aot, max_seq

GPU = "h100-sxm"
SHAPE = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1 << 16)


def run_config(seq: int):
    cfg = Config()
    return dc.replace(cfg, model=dc.replace(cfg.model, dtype="bfloat16", quant="nf4", double_quant=True),
                      data=dc.replace(cfg.data, max_length=seq),
                      train=dc.replace(cfg.train, batch_size=1, remat="full", mlp_chunk=512, offload_residual=True),
                      lora=dc.replace(cfg.lora, r=8, targets="all-linear", dropout=0.0))


@pytest.fixture(scope="module")
def probe():
    try:
        aot.gpu_device(GPU)
    except aot.AotError as e:
        pytest.skip(str(e))
    return max_seq.CompiledProbe(SHAPE, run_config(1024), GPU, "full")


def test_max_seq_finds_the_compiled_boundary(probe):
    budget = probe(2800)  # (a length between the grid's points)
    found = max_seq.search(probe, budget, guess=2048, coarse=1024, fine=512, interpolate=True)  # as the CLI
    peaks = {s: p for s, p, _ in found.probes}
    assert found.best >= 2560  # peak(2560) <= peak(2800): the peak does not shrink with the length
    assert found.best % 512 == 0 and peaks[found.best] <= budget < peaks[found.best + found.fine]
    # the offloaded residual is in host memory: the host temporaries are the L layer inputs [L, B, S, D] in bf16
    S = found.best
    assert probe.compiles[(S, 2)][1]["host_temp"] == SHAPE.num_hidden_layers * S * SHAPE.hidden_size * 2
