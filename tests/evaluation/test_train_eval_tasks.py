"""``train.eval_tasks``: the lm-eval metrics a run logs at its final evaluation equal what ``python -m jqlora.eval
--run`` gives on the checkpoint that run saved (the same step, the same model: an invariant); a misspelt task stops
the run before the model loads, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_lm_eval import _task_dir

from jqlora import eval as cli
from jqlora import train

REPO = Path(__file__).resolve().parents[2]
ARGS = ["lora.r=2", "train.batch_size=2", "train.grad_accum_steps=1", "data.max_length=48", "train.max_steps=2",
        "train.eval_every=0", "train.eval_batches=1", "train.sample_prompt=null", "train.eval_samples=0",
        "log.tensorboard=false", "train.log_every=1", "model.dtype=float32", "train.remat=none"]


def test_eval_tasks_at_eval_time_equal_jqlora_eval_on_the_checkpoint(tmp_path, capsys):
    tasks = _task_dir(tmp_path)
    out = tmp_path / "run"
    assert train.main(["--no-progress", *ARGS, f"output_dir={out}", "train.eval_tasks=[jq_mc,jq_ppl]",
                       "train.eval_tasks_limit=3", f"train.eval_tasks_include_path={tasks}"]) == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]  # (before training and at the end)
    logged = {k: v for k, v in evals[-1].items() if k.startswith("eval_tasks/")}
    assert {"eval_tasks/jq_mc/acc", "eval_tasks/jq_mc/acc_norm", "eval_tasks/jq_ppl/word_perplexity"} <= set(logged)
    assert evals[0]["eval_tasks/jq_ppl/word_perplexity"] != logged["eval_tasks/jq_ppl/word_perplexity"]  # (trained)
    capsys.readouterr()

    assert cli.main(["--run", str(out), "--tasks", "jq_mc,jq_ppl", "--include-path", str(tasks), "--limit", "3",
                     "--batch-size", "2", "--bootstrap-iters", "0", "--output-path", str(tmp_path / "eval")]) == 0
    (written,) = (tmp_path / "eval").glob("results_*.json")
    results = json.loads(written.read_text())["results"]
    for key, value in logged.items():
        _, task, metric = key.split("/")
        assert value == pytest.approx(results[task][f"{metric},none"], rel=1e-5), key


def test_an_unknown_eval_task_stops_the_run_in_one_line(tmp_path, capsys):
    tasks = _task_dir(tmp_path)
    code = train.main(["--no-progress", *ARGS, f"output_dir={tmp_path / 'run'}", "train.eval_tasks=[jq_mcc]",
                       f"train.eval_tasks_include_path={tasks}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any(line.startswith("error: train.eval_tasks jq_mcc: unknown task") and "jq_mc" in line for line in err), err
