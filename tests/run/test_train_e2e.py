"""`python -m jqlora.train` end to end, in real processes: the demo learns, a run resumed in a fresh process equals an
uninterrupted one (also past a half-written checkpoint), and bad input leaves existing checkpoints untouched."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]


def train(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_demo_learns_and_writes_the_adapter(tmp_path):
    """The README's main job (no arguments but the output dir): the held-out loss falls by at least half."""
    r = train(f"output_dir={tmp_path / 'demo'}", cwd=tmp_path)  # not the repo: demo paths resolve all the same
    assert r.returncode == 0, r.stderr
    evals = [x["eval_loss"] for x in records(tmp_path / "demo") if "eval_loss" in x]
    assert len(evals) >= 3 and evals[-1] <= 0.5 * evals[0], evals
    adapter = tmp_path / "demo" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file() and (tmp_path / "demo" / "loss.png").is_file()
    assert "[before training]" in r.stdout and "[after 60 steps]" in r.stdout
    # France is one of the held-out countries: no chat mentions it, the base read its capital only in pretraining
    # text. The fine-tuned model answers its chat question in the trained form with the right fact.
    assert "France" not in (REPO / "assets" / "demo" / "chat.jsonl").read_text()
    after = r.stdout.split("[after 60 steps] What is the capital of France?\n", 1)[1].splitlines()[0]
    assert after.strip() == "-> The capital of France is Paris.", after


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_args(assets):
    return [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
            f"data.eval_path={assets / 'eval.jsonl'}", "data.max_length=48", "lora.r=4", "lora.dropout=0.1",
            "train.log_every=1", "train.eval_every=2", "train.warmup_steps=1", "train.learning_rate=1e-2",
            "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=10", "train.sample_prompt=null"]


def test_resume_in_a_fresh_process_equals_uninterrupted(run_args, tmp_path):
    """Also: the first loss line after the resume averages its whole window (steps 1-4, half of them before the
    stop), and a finished run that is run again adds nothing to its metrics (issue 12, defect 8)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_args = [*run_args, "train.log_every=4"]
    assert train(*run_args, f"output_dir={straight}").returncode == 0
    first = train(*run_args, f"output_dir={resumed}", "train.stop_at_step=3")
    assert first.returncode == 0 and "stopped at step 3" in first.stderr, first.stderr
    ckpts = resumed / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1, 2, 3]
    # A save of step 4 killed halfway (kill -9 during the write): orbax writes into a temporary directory and
    # renames it when complete, so this is what such a crash leaves behind. Resume must ignore it.
    partial = ckpts / "4.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckpts / "3", partial)
    for f in sorted(p for p in partial.rglob("*") if p.is_file())[:3]:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    second = train(*run_args, f"output_dir={resumed}")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "at step 3" in second.stderr, second.stderr
    # Same adapter (bitwise or 1e-7) and the same logged losses.
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-7, atol=1e-7, err_msg=k)
    losses = lambda out: [(x["step"], x.get("loss"), x.get("eval_loss")) for x in records(out)]  # noqa: E731
    assert losses(straight) == losses(resumed)
    assert [s for s, loss, _ in losses(resumed) if loss is not None] == [4, 6]
    finished = records(resumed)
    again = train(*run_args, f"output_dir={resumed}")
    assert again.returncode == 0 and "already finished at step 6" in again.stderr, again.stderr
    assert records(resumed) == finished


@pytest.fixture(scope="module")
def finished_run(run_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(*run_args, f"output_dir={out}", "train.max_steps=2").returncode == 0
    return out


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n',
     "train.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": "x"}\n',
     "train.jsonl:2: missing 'messages'"),
    ("", "no records (empty dataset)"),
    (None, "has a trained token within data.max_length=6"),
])
def test_bad_input_is_one_line_and_leaves_checkpoints_untouched(run_args, finished_run, tmp_path, bad, message):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    args = list(run_args)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    if bad is None:
        args.append("data.max_length=6")
        saved["data"]["max_length"] = 6
    else:
        (tmp_path / "train.jsonl").write_text(bad)
        args.append(f"data.path={tmp_path / 'train.jsonl'}")
        saved["data"]["path"] = str(tmp_path / "train.jsonl")
    # the run's data changed under it (same config): the resume gets past the config check to the data
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    before = _tree_digest(out)
    r = train(*args, f"output_dir={out}", "train.max_steps=4")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert _tree_digest(out) == before
