"""Learning works, QLoRA as well as LoRA: `tools/qlora_vs_lora.py`'s pairs task (every key has two values, so the
best possible loss over the training set is known exactly: ln 2 per row over its trained tokens), seed 0, 400 steps.
Oracle: the same run with plain LoRA on the unquantized base. The QLoRA paper's claim at small scale: the 4-bit base
reaches the 16-bit one's final loss (here within 5%; measured +1.2% for this seed, mean −0.2% over seeds 0–2)."""

from __future__ import annotations

from tool_module import load_tool


def _tool():
    return load_tool("qlora_vs_lora")


def test_qlora_reaches_lora_final_loss(tmp_path):
    r = _tool().compare("pairs", 400, tmp_path, ["train.seed=0"])
    floor = r["optimal_loss"]
    start = {q: c[0][1] for q, c in r["curves"].items()}
    final = r["final"]
    for q in ("nf4", "none"):
        # no run can beat the known optimum over the very rows it is scored on, and both learned most of the way
        assert floor - 1e-6 <= final[q] < floor + 0.1 * (start[q] - floor), (q, floor, start[q], final[q])
    assert abs(final["nf4"] - final["none"]) <= 0.05 * final["none"], final
