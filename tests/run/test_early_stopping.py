"""Early stopping and the best checkpoint (jqlora.run.best; issue 28, item 8).

The oracle is transformers itself: its `EarlyStoppingCallback` and `Trainer._determine_best_metric`, driven with a
real `TrainingArguments` (its own greater_is_better inference), a `TrainerState` and a `TrainerControl`, fed the
same eval curve in the same order as the Trainer calls them (the callback in `evaluate`, then the best metric). The
runs are the tiny Llama of tests/conftest.py with the eval loss scripted per step (the trainer's `evaluate` replaced
on the instance), so the stop step is known from the curve alone.
"""

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jqlora import export as E
from jqlora.config import ConfigError, load_config
from jqlora.config.schema import TrainConfig
from jqlora.run import RunDir, Trainer, UserError
from jqlora.run.best import BestTracker

pytestmark = pytest.mark.usefixtures("compilation_cache")  # every trainer here compiles the same step

# an eval at every step: step 4 beats the best by less than the threshold (the best moves, the counter does not
# reset), step 5 by more; 6, 7, 8 do not beat 1.10 (7 is within the threshold above it): patience 3 runs out at 8
CURVE = {0: 2.0, 1: 1.5, 2: 1.2, 3: 1.25, 4: 1.18, 5: 1.10, 6: 1.2, 7: 1.105, 8: 1.3, 9: 1.0, 10: 0.9}
PATIENCE, THRESHOLD, EVAL_EVERY = 3, 0.05, 1


@functools.cache
def _training_args(metric: str, greater):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir="unused", eval_strategy="steps", eval_steps=EVAL_EVERY, save_strategy="steps",
                             save_steps=EVAL_EVERY, load_best_model_at_end=True, metric_for_best_model=metric,
                             greater_is_better=greater, report_to=[], use_cpu=True)


def oracle(curve: dict, patience, threshold: float, metric: str = "loss", greater=None):
    """(stop step or None, best step, best metric, [patience counter after each eval]) by transformers."""
    from transformers import EarlyStoppingCallback, Trainer as HFTrainer, TrainerControl, TrainerState

    args = _training_args(metric, greater)  # (its own greater_is_better inference)
    callback = EarlyStoppingCallback(patience if patience is not None else 10**9, threshold)
    state, control = TrainerState(), TrainerControl()
    fake = SimpleNamespace(args=args, state=state)
    counters = []
    for step in sorted(curve):
        state.global_step = step
        metrics = {f"eval_{metric.removeprefix('eval_')}": curve[step]}
        callback.on_evaluate(args, state, control, metrics)  # (inside Trainer.evaluate: sees the old best)
        HFTrainer._determine_best_metric(fake, metrics=metrics, trial=None)
        counters.append(callback.early_stopping_patience_counter)
        if control.should_training_stop:
            return step, state.best_global_step, state.best_metric, counters
    return None, state.best_global_step, state.best_metric, counters


class _Dir:
    primary, out, protected = False, "/nonexistent", set()


def test_tracker_equals_transformers_on_random_curves():
    """Counters, best step and metric, and the stop after every evaluation, on 300 curves with ties, NaN, plateaus."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 15))
        values = np.round(rng.normal(1.0, 0.3, n), 1)  # (rounding makes ties and plateaus)
        values[rng.random(n) < 0.05] = np.nan
        curve = {2 * i: float(v) for i, v in enumerate(values)}
        patience = int(rng.integers(1, 5))
        threshold = float(rng.choice([0.0, 0.05, 0.15]))
        metric, greater = [("loss", None), ("eval_accuracy", None), ("accuracy", False), ("eval_loss", True)][trial % 4]
        want_stop, want_step, want_best, want_counters = oracle(curve, patience, threshold, metric, greater)
        tc = dataclasses.replace(TrainConfig(), early_stopping_patience=patience, metric_for_best=metric,
                                 early_stopping_threshold=threshold, greater_is_better=greater)
        tracker, stop, counters = BestTracker(tc, _Dir()), None, []
        for step in sorted(curve):
            tracker.update(step, {"eval_loss": curve[step], "eval_accuracy": curve[step]})
            counters.append(tracker.counter)
            if tracker.stopped:
                stop = step
                break
        assert (stop, counters, tracker.best_step) == (want_stop, want_counters, want_step), (curve, trial)
        if want_step is not None:
            assert tracker.best_metric == want_best


def _cfg(assets, out, *overrides):
    base = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
            f"data.eval_path={assets / 'eval.jsonl'}", "data.max_length=48", f"output_dir={out}", "lora.r=4",
            "train.batch_size=4", "train.grad_accum_steps=1", "train.max_steps=10", "train.log_every=1",
            f"train.eval_every={EVAL_EVERY}", "train.save_every=2", "train.keep_checkpoints=1", "train.keep_best=true",
            f"train.early_stopping_patience={PATIENCE}", f"train.early_stopping_threshold={THRESHOLD}",
            "train.learning_rate=5e-3", "train.warmup_steps=0", "log.tensorboard=false", "train.sample_prompt=null"]
    return load_config(None, base + list(overrides))


class Killed(BaseException):
    """A kill -9 between two evaluations, in-process: nothing after it runs (no save, no export)."""


def _scripted(trainer: Trainer, kill_before: int | None = None, keep: dict | None = None) -> Trainer:
    """``trainer`` with the eval loss of each step taken from CURVE (and the adapter of each eval step kept)."""
    def evaluate():
        trainer.eval_accuracy = 0.0
        if keep is not None:
            keep[trainer.step] = jax.tree.map(np.asarray, trainer.lora)
        return CURVE[trainer.step]

    trainer.evaluate = evaluate
    if kill_before is not None:
        step_once = trainer.one_step

        def one_step():
            if trainer.step + 1 == kill_before:
                raise Killed
            return step_once()
        trainer.one_step = one_step
    return trainer


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    import logging

    out = tmp_path_factory.mktemp("es") / "straight"
    kept, lines = {}, []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("jqlora.train")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = _scripted(Trainer(_cfg(assets, out), progress=False), keep=kept)
        assert trainer.run() == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    trainer.lines = lines
    return out, trainer, kept


def test_stops_where_transformers_stops_and_keeps_the_best(straight):
    out, trainer, _ = straight
    stop, best, best_metric, _ = oracle(CURVE, PATIENCE, THRESHOLD)
    assert (stop, best) == (8, 5)  # (the curve was built for this; the oracle says so independently)
    records = _records(out)
    assert trainer.step == stop
    assert max(r["step"] for r in records if "loss" in r) == stop  # no step trained after the stop
    assert sorted(r["step"] for r in records if "eval_loss" in r) == list(range(0, stop + 1, EVAL_EVERY))
    # keep_checkpoints=1 rotated away every other checkpoint (new bests at 0 to 5; saves at 2, 4, 6, 8)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [best, stop]
    said = [line for line in trainer.lines if line.startswith("early stopping:")]
    assert said == [f"early stopping: eval_loss did not improve by more than {THRESHOLD:g} in {PATIENCE} evaluation(s) "
                    f"(train.early_stopping_patience={PATIENCE}); stopped at step {stop}, the best eval_loss: "
                    f"{best_metric:.6g} at step {best}"]
    got = json.loads((out / "best.json").read_text())
    assert (got["best_step"], got["best_metric"], got["patience_counter"], got["stopped"]) == (
        best, best_metric, PATIENCE, True)


def test_a_stopped_run_run_again_stays_stopped(straight, assets):
    out, _, _ = straight
    before = (out / "metrics.jsonl").read_text()
    again = Trainer(_cfg(assets, out), progress=False, export=False)
    again.evaluate = lambda: pytest.fail("a stopped run evaluated again")
    assert again.run() == 0 and again.step == 8
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_after_a_kill_between_evals_keeps_the_patience_count(straight, assets, tmp_path):
    out, _, _ = straight
    killed = tmp_path / "killed"
    # killed before step 8: the newest checkpoint is 6 (counter 1, best 1.10 at step 5), step 7 logged
    with pytest.raises(Killed):
        _scripted(Trainer(_cfg(assets, killed), progress=False, export=False), kill_before=8).run()
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir()) == [5, 6]
    assert max(r["step"] for r in _records(killed)) == 7
    resumed = _scripted(Trainer(_cfg(assets, killed), progress=False, export=False))
    assert resumed.run() == 0
    # a patience count restarted at the resume would not run out at 8 (steps 9 and 10 improve again)
    assert resumed.step == 8
    want, got = _records(out), _records(killed)
    assert [(r["step"], r.get("eval_loss")) for r in got] == [(r["step"], r.get("eval_loss")) for r in want]
    np.testing.assert_allclose([r["loss"] for r in got if "loss" in r], [r["loss"] for r in want if "loss" in r],
                               rtol=1e-6)
    assert json.loads((killed / "best.json").read_text()) == json.loads((out / "best.json").read_text())
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir()) == [5, 8]


def test_export_best_is_the_best_steps_adapter_and_loads_in_peft(straight, assets, tmp_path, capsys):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from jqlora.adapters import init_state
    from jqlora.lora import LoraConfig

    out, trainer, kept = straight
    capsys.readouterr()
    assert E.main([str(out), str(tmp_path / "best"), "--best"]) == 0
    # the one-line summary names the step it exported and its metric (transformers' best step and value)
    _, best, best_metric, _ = oracle(CURVE, PATIENCE, THRESHOLD)
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary == f"wrote {tmp_path / 'best'} from step {best}, the best eval_loss: {best_metric:.6g}", summary
    # the oracle: the adapter the run held in memory at step 5, written by the same writer
    ref = init_state.save_adapter(trainer.split.model(jax.tree.map(np.asarray, kept[5])), trainer.cfg, str(out),
                                  str(tmp_path / "ref"), lora_config=LoraConfig.from_config(trainer.cfg.lora),
                                  base=str(assets / "model"), card={"steps": 5})
    got = load_file(tmp_path / "best" / "adapter_model.safetensors")
    want = load_file(Path(ref) / "adapter_model.safetensors")
    last = load_file(out / "adapter" / "adapter_model.safetensors")  # (step 8's: must differ)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
    assert any(not np.array_equal(got[k], last[k]) for k in got)

    base = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "best")
    loaded = get_peft_model_state_dict(peft_model)
    assert sorted(loaded) == sorted(got)
    for k in got:
        np.testing.assert_array_equal(loaded[k].numpy(), got[k])


def test_export_best_errors_are_one_line(straight, assets, tmp_path, capsys):
    out, _, _ = straight
    gone = tmp_path / "gone"
    shutil.copytree(out, gone)
    shutil.rmtree(gone / "checkpoints" / "5")
    assert E.main([str(gone), str(tmp_path / "x"), "--best"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "best step 5" in err and "train.keep_best=true" in err, err
    assert E.main([str(out), str(tmp_path / "y"), "--best", "--step", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--best" in err, err

    # a run that evaluated nothing records no best: its checkpoints' meta (as a run before this feature, and as a run
    # without eval data writes it) over the straight run's arrays
    _, trainer, _ = straight
    none = tmp_path / "noeval"
    none.mkdir()
    shutil.copy(out / "config.yaml", none / "config.yaml")
    run = RunDir(none, keep=1)
    meta = {"step": 8, "data": trainer.iterator.state(), "total_steps": trainer.total_steps}
    for step, best in ((8, None), (9, BestTracker(trainer.tc, run).state())):
        run.save(step, trainer._ckpt_tree(), meta if best is None else {**meta, "step": step, "best": best})
        assert E.main([str(none), str(tmp_path / f"z{step}"), "--best"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "recorded no best" in err and f"step {step}" in err, err
    run.close()


@pytest.mark.parametrize("overrides, key", [
    (["train.early_stopping_patience=2", "train.eval_every=0", "data.eval_fraction=0.1"], "train.eval_every"),
    (["train.early_stopping_patience=2"], "data.eval_path"),
    (["train.metric_for_best=eval_rouge", "data.eval_fraction=0.1"], "eval_loss, eval_perplexity, eval_accuracy"),
    (["train.early_stopping_patience=0", "data.eval_fraction=0.1"], "must be >= 1"),
    (["train.early_stopping_threshold=-1"], "must be >= 0"),
    (["train.keep_best=true", "train.objective=grpo", "grpo.rewards=[x.y:z]"], "train.objective=grpo has none"),
])
def test_config_errors_are_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value) and key in str(e.value), str(e.value)


@pytest.mark.parametrize("override, words", [
    ("train.eval_every=0", "train.early_stopping_patience=3 counts evaluations: it needs train.eval_every >= 1"),
    ("train.metric_for_best=bleu", "train.metric_for_best='bleu' names nothing the evaluation logs"),
])
def test_the_cli_says_a_config_error_in_one_line(tmp_path, override, words):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "jqlora.train", f"model.path={tmp_path}", f"data.path={tmp_path}",
                           "data.eval_fraction=0.1", "train.early_stopping_patience=3", override],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_a_metric_the_evaluation_does_not_log_is_one_line():
    """(preference objectives log their own eval_ metrics: checked at the first evaluation)"""
    tc = load_config(None, ["train.objective=dpo", "train.metric_for_best=rewards/margin",
                            "data.eval_fraction=0.1"]).train
    with pytest.raises(UserError) as e:
        BestTracker(tc, _Dir()).update(0, {"step": 0, "eval_loss": 0.7, "eval_rewards/margins": 0.1})
    assert str(e.value) == ("train.metric_for_best=eval_rewards/margin: the evaluation logs no such metric (it logs "
                            "eval_loss, eval_rewards/margins)")
