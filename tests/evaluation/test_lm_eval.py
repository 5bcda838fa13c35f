"""`jqlora.evaluation.JqloraLM` against lm-eval's own ``hf`` backend with ``peft=`` (the oracle), on one tiny random
Llama (float32, no quantization) with a peft LoRA adapter whose B is nonzero, and three local tasks: multiple choice
(loglikelihood), generation until stop strings (generate_until, exact_match) and perplexity (loglikelihood_rolling,
several windows of max_length = 48 tokens). Per-request loglikelihoods agree within 1e-4, the greedy flags, the
generated strings and every metric exactly; the scorer compiles once per (batch, length) bucket."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lm_eval
import peft
import pytest
import torch

from jqlora.evaluation import JqloraLM, TaskError, evaluate, resolve_tasks
from tiny import make_family_model

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "fixtures" / "tokenizer"
MAX_LENGTH = 48  # (the rolling documents need several windows)
TASKS = ["jq_mc", "jq_gen", "jq_ppl"]

MC = [("the cat sat on the", ["mat", "moon", "sky"], 0), ("two plus two is", ["four", "five"], 0),
      ("the sky is", ["blue", "green", "loud", "red"], 0), ("water is", ["wet", "dry"], 0),
      ("fire is", ["cold", "hot"], 1), ("a dog says", ["meow", "woof", "moo"], 1),
      ("snow is", ["white", "black"], 0), ("the sun rises in the", ["west", "east"], 1)]
GEN = [("the capital of France", "Paris"), ("one two three", "four"), ("red green", "blue"), ("hello", "world")]
PPL = ["The quick brown fox jumps over the lazy dog. " * 4, "A short line.",
       "Tokens are scored in rolling windows when a document is longer than the context of the model. " * 2]


def _task_dir(root: Path) -> Path:
    d = root / "tasks"
    d.mkdir()
    rows = {"mc": [{"question": q, "choices": c, "label": y} for q, c, y in MC],
            "gen": [{"question": q, "answer": a} for q, a in GEN], "ppl": [{"text": t} for t in PPL]}
    for name, docs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    head = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (d / "mc.yaml").write_text("task: jq_mc\n" + head.format(d / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    (d / "gen.yaml").write_text("task: jq_gen\n" + head.format(d / "gen.jsonl") + (
        "output_type: generate_until\ndoc_to_text: \"{{question}}:\"\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\", \"or\"]\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    (d / "ppl.yaml").write_text("task: jq_ppl\n" + head.format(d / "ppl.jsonl") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"))
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    base, model_dir = make_family_model(root / "model", "llama", vocab_size=512, max_position_embeddings=256)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, model_dir / name)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(root / "adapter")
    _, manager = resolve_tasks(TASKS, _task_dir(root))  # (every task is in the folder: lm-eval's are not indexed)
    kw = dict(limit=None, log_samples=True, bootstrap_iters=0)
    hf = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "peft": str(root / "adapter"), "dtype": "float32",
                                "device": "cpu", "max_length": MAX_LENGTH},
        batch_size=4, tasks=TASKS, task_manager=manager, **kw)
    lm = JqloraLM(pretrained=str(model_dir), adapter=str(root / "adapter"), quant="none", dtype="float32",
                  batch_size=4, max_length=MAX_LENGTH)
    ours = evaluate(lm, TASKS, manager, **kw)
    return hf, ours, lm, manager


def _by_doc(results, task):
    return {s["doc_id"]: s for s in results["samples"][task]}


def test_loglikelihoods_and_accuracy_equal_hf_peft(setup):
    hf, ours, _, _ = setup
    h, o = _by_doc(hf, "jq_mc"), _by_doc(ours, "jq_mc")
    assert sorted(h) == sorted(o) == list(range(len(MC)))
    worst = 0.0
    for d in h:
        (hl, hg), (ol, og) = zip(*[r[0] for r in h[d]["resps"]]), zip(*[r[0] for r in o[d]["resps"]])
        assert len(hl) == len(MC[d][1])
        worst = max(worst, max(abs(float(a) - float(b)) for a, b in zip(hl, ol)))
        assert list(map(bool, hg)) == list(map(bool, og)), d
        assert h[d]["acc"] == o[d]["acc"] and h[d]["acc_norm"] == o[d]["acc_norm"], d
    print(f"multiple choice: worst |loglikelihood - hf's| {worst:.2e}, acc {ours['results']['jq_mc']['acc,none']}")
    assert worst < 1e-4, worst
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["jq_mc"][metric] == hf["results"]["jq_mc"][metric], metric


def test_generations_equal_hf_peft(setup):
    hf, ours, _, _ = setup
    h, o = _by_doc(hf, "jq_gen"), _by_doc(ours, "jq_gen")
    texts = [h[d]["resps"][0][0] for d in sorted(h)]
    assert [o[d]["resps"][0][0] for d in sorted(o)] == texts
    assert any(texts), texts  # (something was generated: the comparison is not between empty strings)
    print(f"generations: {texts}")
    assert ours["results"]["jq_gen"]["exact_match,none"] == hf["results"]["jq_gen"]["exact_match,none"]


def test_rolling_loglikelihoods_equal_hf_peft(setup):
    hf, ours, lm, _ = setup
    h, o = _by_doc(hf, "jq_ppl"), _by_doc(ours, "jq_ppl")
    assert len(lm.tok_encode(PPL[0])) > 2 * MAX_LENGTH  # (several windows)
    gaps = [abs(float(h[d]["resps"][0][0]) - float(o[d]["resps"][0][0])) for d in sorted(h)]
    print(f"rolling: |loglikelihood - hf's| {max(gaps):.2e} at most, hf's {[h[d]['resps'][0][0] for d in sorted(h)]}")
    assert max(gaps) < 1e-4, gaps
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["jq_ppl"][metric] == pytest.approx(hf["results"]["jq_ppl"][metric], rel=1e-4)


def test_one_compile_per_bucket(setup):
    _, _, lm, _ = setup
    # every row of the three tasks fits MAX_LENGTH = 48 tokens: the buckets are 16, 32 and 64 slots at most
    assert lm.scorer.compiles <= 3


def test_unknown_task_is_one_line(setup):
    folder = Path(setup[2].tokenizer.name_or_path).parent / "tasks"
    assert setup[3].all_tasks == sorted(TASKS)  # (the folder's tasks alone: lm-eval's were not indexed)
    names, _ = resolve_tasks(["jq_mc", "jq_*", str(folder / "mc.yaml")], folder, include_defaults=False)
    assert names == ["jq_mc", "jq_*", str(folder / "mc.yaml")]
    with pytest.raises(TaskError, match="jq_mcc: unknown task.*did you mean jq_mc") as e:
        resolve_tasks(["jq_mcc"], folder, include_defaults=False)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# python -m jqlora.eval


def test_cli_prints_the_table_and_writes_hf_s_numbers(setup, capsys, tmp_path):
    from jqlora import eval as cli

    hf, _, lm, _ = setup
    root = Path(lm.tokenizer.name_or_path).parent
    out = tmp_path / "out"
    code = cli.main(["--model", str(root / "model"), "--adapter", str(root / "adapter"), "--tasks", "jq_mc,jq_gen",
                     "--include-path", str(root / "tasks"), "--quant", "none", "--dtype", "float32", "--max-length",
                     str(MAX_LENGTH), "--max-gen-toks", "16", "--batch-size", "4", "--bootstrap-iters", "0",
                     "--log-samples", "--output-path", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "jq_mc" in printed.out and "acc_norm" in printed.out and "exact_match" in printed.out  # lm-eval's table
    (written,) = out.glob("results_*.json")
    results = json.loads(written.read_text())["results"]
    assert results["jq_mc"]["acc,none"] == hf["results"]["jq_mc"]["acc,none"]
    assert results["jq_gen"]["exact_match,none"] == hf["results"]["jq_gen"]["exact_match,none"]
    samples = [json.loads(line) for line in next(out.glob("samples_*_jq_gen.jsonl")).read_text().splitlines()]
    hf_texts = {s["doc_id"]: s["resps"][0][0] for s in hf["samples"]["jq_gen"]}
    assert {s["doc_id"]: s["resps"][0][0] for s in samples} == hf_texts


@pytest.mark.parametrize("case", ["unknown task", "missing adapter", "not an adapter", "no source", "step alone"])
def test_cli_mistakes_are_one_line(setup, capsys, tmp_path, case):
    from jqlora import eval as cli

    root = Path(setup[2].tokenizer.name_or_path).parent
    model, adapter, tasks = str(root / "model"), str(root / "adapter"), str(root / "tasks")
    argv, expected = {
        "unknown task": (["--model", model, "--tasks", "jq_mc,nope.yaml", "--include-path", tasks],
                         "--tasks nope.yaml: no such task YAML file"),
        "missing adapter": (["--model", model, "--adapter", str(tmp_path / "gone"), "--tasks", "jq_mc"],
                            f"--adapter {tmp_path / 'gone'}: not a directory"),
        "not an adapter": (["--model", model, "--adapter", tasks, "--tasks", "jq_mc"],
                           "adapter_config.json: missing"),
        "no source": (["--tasks", "jq_mc"], "give --model DIR"),
        "step alone": (["--model", model, "--adapter", adapter, "--step", "3", "--tasks", "jq_mc"],
                       "--step goes with --run"),
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_cli_run_equals_its_exported_adapter_on_the_nf4_base(setup, capsys, tmp_path):
    """--run (a checkpoint restored as trained: the demo base in NF4 + double quantization, float32 compute) scores
    as --model BASE --adapter EXPORT of the same checkpoint does, and writes into RUN/eval by default."""
    import yaml

    from jqlora import eval as cli
    from jqlora import export

    folder = Path(setup[2].tokenizer.name_or_path).parent / "tasks"
    run = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "flat_layout_run", run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["path"] = str(REPO / "assets" / "demo" / "model")
    saved["data"]["path"] = str(REPO / "assets" / "demo" / "chat.jsonl")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    common = ["--tasks", "jq_mc", "--include-path", str(folder), "--limit", "4", "--batch-size", "4",
              "--bootstrap-iters", "0", "--log-samples"]
    assert cli.main(["--run", str(run), *common]) == 0, capsys.readouterr().err
    assert "at step 2" in capsys.readouterr().err
    assert export.main([str(run), str(tmp_path / "adapter")]) == 0
    assert cli.main(["--model", saved["model"]["path"], "--adapter", str(tmp_path / "adapter"), "--quant", "nf4",
                     "--dtype", "float32", "--output-path", str(tmp_path / "out"), *common]) == 0
    capsys.readouterr()

    def per_choice(folder):
        (samples,) = folder.glob("samples_*_jq_mc.jsonl")
        return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in map(json.loads, samples.open())}

    from_run, from_export = per_choice(run / "eval"), per_choice(tmp_path / "out")
    assert sorted(from_run) == [0, 1, 2, 3]  # (--limit 4)
    for d in from_run:
        assert from_run[d] == pytest.approx(from_export[d], abs=1e-5), d
