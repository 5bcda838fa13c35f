"""tools/grpo_learning.py's statistics: the pooled first / last window of a run's metrics.jsonl against numpy on the
raw per-completion rewards the rows were logged from (by the trainer's own `rollout_metrics`), and its samples.

The training runs themselves (minutes) are not run here: their figures are in the README's GRPO section.
"""

import json

import numpy as np
import pytest

from jqlora.training.grpo import rollout_metrics
from tool_module import load_tool

tool = load_tool("grpo_learning")
STEPS, PER_STEP, G, WINDOW = 25, 32, 8, 10


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose metrics.jsonl rows (shuffled order) come from known rewards, rising over the steps."""
    rng = np.random.default_rng(0)
    p = np.linspace(0.2, 0.9, STEPS)
    raw = (rng.random((STEPS, PER_STEP)) < p[:, None]).astype(np.float32)
    out = tmp_path_factory.mktemp("runs") / "seed-0"
    out.mkdir()
    mask = np.ones((PER_STEP, 16), np.int32)
    rows = []
    for s in range(STEPS):
        m = rollout_metrics(raw[s][:, None], ["answer_first"], None, np.zeros(PER_STEP, bool), mask,
                            np.ones(PER_STEP, bool))
        rows.append({"step": s + 1, "loss": 0.0, **m})
    rows.append({"step": STEPS, "eval_loss": 1.0})  # (a row without a reward is skipped)
    order = rng.permutation(len(rows))
    (out / "metrics.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    groups = [{"step": s + 1, "prompt": f"q{s}", "completions": [f"c{s}.{j}" for j in range(G)],
               "reward": [float(x) for x in raw[s, :G]]} for s in range(STEPS)]
    (out / "completions.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    return out, raw


def test_windows_equal_numpy_on_the_raw_rewards(run_dir):
    out, raw = run_dir
    s = tool.summarize(out, WINDOW, PER_STEP)
    assert s["steps"] == STEPS
    for name, block in (("first", raw[:WINDOW]), ("last", raw[-WINDOW:])):
        flat = block.astype(np.float64).ravel()
        got = s[name]
        assert got["n"] == flat.size
        np.testing.assert_allclose(got["mean"], flat.mean(), rtol=1e-6)
        np.testing.assert_allclose(got["se"], flat.std(ddof=1) / np.sqrt(flat.size), rtol=1e-5)
        step_means = block.mean(axis=1)
        np.testing.assert_allclose(got["se_steps"], step_means.std(ddof=1) / np.sqrt(WINDOW), rtol=1e-5)
    assert s["last"]["mean"] > s["first"]["mean"]


def test_samples_are_the_first_and_last_groups(run_dir):
    out, raw = run_dir
    before, after = tool.samples(out, 3)
    assert (before["step"], after["step"]) == (1, STEPS)
    assert before["completions"] == ["c0.0", "c0.1", "c0.2"] and after["prompt"] == f"q{STEPS - 1}"
    assert after["reward"] == [float(x) for x in raw[-1, :3]]


def test_too_few_steps_is_one_line(run_dir):
    out, _ = run_dir
    with pytest.raises(SystemExit, match="fewer than 2 x --window 13"):
        tool.summarize(out, 13, PER_STEP)


def test_report_prints_the_windows(run_dir, capsys):
    """``--report`` (no training) on a kept folder: the table row holds the numpy means, the samples the groups."""
    out, raw = run_dir
    tool.main(["--report", str(out.parent), "--seeds", "0", "--window", str(WINDOW)])
    text = capsys.readouterr().out
    row = next(line.split() for line in text.splitlines() if line.split()[:2] == ["0", str(STEPS)])
    assert float(row[2]) == pytest.approx(raw[:WINDOW].mean(), abs=5e-4)
    assert float(row[5]) == pytest.approx(raw[-WINDOW:].mean(), abs=5e-4)
    assert row[-1] == "-"  # (no wall time was kept)
    assert f"after (step {STEPS}, group mean reward {raw[-1, :G].mean():.2f} of {G}): 'q{STEPS - 1}'" in text
