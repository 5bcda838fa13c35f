"""`python -m jqlora.plan --max-seq` without --compile (jqlora.planning.max_seq over the analytic plan):

- the search finds the boundary of a peak whose boundary is known in closed form, from guesses below, at and above
  it, on both grids;
- the CLI's answer N on a small shape is the boundary of the plan itself: `memory_plan` at N tokens fits the
  usable budget and at N + 1 it does not (the search refines the analytic plan to 1 token);
- the long-context savings are what make the difference: turning them off shortens the answer;
- no budget is a one-line usage error.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jqlora import plan
from jqlora.planning import HEADROOM, max_seq, memory_plan
from jqlora.models import ModelConfig

SMALL = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 704,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


@pytest.mark.parametrize("guess", [4096, 123_456, 1 << 20])
@pytest.mark.parametrize("fine", [1, 256])
@pytest.mark.parametrize("interpolate", [False, True])
@pytest.mark.parametrize("curve", ["affine", "convex", "steps"])
def test_search_finds_a_known_boundary(guess, fine, interpolate, curve):
    a, b, budget = 3.0e9, 37_123.0, 40.0e9  # peak(S) = a + b·S: the longest S is floor((budget - a) / b)
    peak = {"affine": lambda s: a + b * s,
            "convex": lambda s: a + b * s * (s / 1e6) ** 2,  # (the interpolation's split lands off the boundary)
            "steps": lambda s: a + b * 4096 * np.ceil(s / 4096)}[curve]  # (flat stretches: the line meets no probe)
    grid = np.arange(0, 2 << 20, fine, dtype=np.float64)
    exact = int(grid[peak(grid) <= budget].max())  # (brute force on the fine grid)
    found = max_seq.search(peak, budget, guess=guess, fine=fine, interpolate=interpolate)
    assert found.best == exact
    assert found.over()[0] == found.best + fine
    if interpolate and curve == "affine":
        assert len(found.probes) <= 8  # (from 4096 the bracket grows at most 4x a probe)


def _max_seq(capsys, *args) -> int:
    code = plan.main(["--model-config", json.dumps(SMALL), "--max-seq", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return int(re.search(r"^max seq: (\d+) tokens$", out, re.MULTILINE).group(1))


def test_cli_answer_is_the_plans_boundary(capsys):
    budget = 2.0  # GB
    n = _max_seq(capsys, "--memory", str(budget))
    shape = ModelConfig.from_hf(SMALL)

    def total(seq):
        return memory_plan(shape, seq=seq, remat="full", attention="cudnn", mlp_chunk=max_seq.LONG_MLP_CHUNK,
                           offload_residual=True).total

    assert total(n) <= HEADROOM * budget * 1e9 < total(n + 1)
    assert _max_seq(capsys, "--memory", str(budget), "--mlp-chunk", "0", "--no-offload-residual") < n


def test_max_seq_needs_a_budget(capsys):
    assert plan.main(["--model", "llama3-8b", "--max-seq"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--memory" in err


def test_correction_by_the_full_depth_offset():
    """A full-depth peak 0.16 GB above the extrapolation at the answer: the corrected answer is where the line
    through the probes, shifted up by 0.16 GB, meets the budget (closed form on an affine peak)."""
    a, b, budget = 6.0e9, 87_000.0, 77.6e9
    found = max_seq.search(lambda s: a + b * s, budget, guess=700_000, fine=1024, interpolate=True)
    exact = int((budget - 0.16e9 - a) // b) // 1024 * 1024
    assert max_seq.corrected(found, 0.16e9, budget) == exact < found.best
    assert max_seq.corrected(found, 0.0, budget) == found.best
