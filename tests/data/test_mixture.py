"""Several datasets in one run (issue 28, item 8): data.path as a list, concatenated (no weights) or mixed by weight.

Oracles: the binomial law of the mixture's draws (each row's source is a categorical draw with p = weight / Σ weights,
so over N rows a source's count has mean N·p and standard error sqrt(N·p·(1-p))); a resumed iterator's batches
against an uninterrupted one's (the data order is a pure function of (seed, epoch, index)); the sources' own files
(each row's example names its file). Errors are one line naming data.path[i], before JAX (a fresh process shows it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jqlora import data as D
from jqlora.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "fixtures" / "tokenizer"


class _Rows:
    """A dataset whose batches are its row ids (as the trainer's parallel.RowIds)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, rows):
        return list(rows)


def test_mixture_proportions_hold_over_10k_rows():
    counts, weights = [6000, 3000, 1000], [5.0, 3.0, 2.0]  # source 0 subsampled, source 2 repeated
    mix = D.Mixture(weights, counts)
    it = D.BatchIterator(_Rows(sum(counts)), 100, seed=11, mixture=mix)
    rows = np.concatenate([next(it) for _ in range(100)])  # one epoch: 10k rows
    assert it.epoch == 1 and it.index == 0
    source = np.searchsorted(np.cumsum(counts), rows, side="right")
    N, p = len(rows), np.asarray(weights) / sum(weights)
    got = np.bincount(source, minlength=3)
    se = np.sqrt(N * p * (1 - p))
    assert np.all(np.abs(got - N * p) <= 4 * se), (got, N * p, se)
    # within a source the rows come as whole permutations: no row a third time before all a second time
    for i, (lo, n) in enumerate(zip(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)):
        seen = np.bincount(rows[source == i] - lo, minlength=n)
        assert seen.max() - seen.min() <= 1, (i, seen.min(), seen.max())
    # the order is a function of (seed, epoch): the same again, another next epoch or for another seed
    again = D.BatchIterator(_Rows(sum(counts)), 100, seed=11, mixture=mix)
    assert np.array_equal(np.concatenate([next(again) for _ in range(100)]), rows)
    assert not np.array_equal(mix.order(11, 1), mix.order(11, 0))
    assert not np.array_equal(mix.order(12, 0), mix.order(11, 0))


def _chat(user, answer):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    (root / "a.jsonl").write_text("\n".join(_chat(f"say {i}", f"a {i}") for i in range(20)) + "\n")
    (root / "b.jsonl").write_text("\n".join(_chat(f"add {i}", f"b {i} plus {i}") for i in range(7)) + "\n")
    (root / "c.jsonl").write_text("\n".join(json.dumps({"instruction": f"echo {i}", "output": f"c {i}"})
                                            for i in range(5)) + "\n")  # another format
    return root


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer(str(TOKENIZER))


def _source_of(ds, row):
    return os.path.basename(ds.examples[ds.rows[row][0]].where.split(":")[0])


def test_concatenation_keeps_every_row_of_every_source(files, tok):
    cfg = load_config(None, [f"data.path=[{files / 'a.jsonl'},{files / 'b.jsonl'},{files / 'c.jsonl'}]",
                             "data.eval_fraction=0.2", "data.max_length=64"])
    train, ev = D.build_datasets(cfg.data, tok, seed=0)
    assert train.mixture is None and [len(p) for _, p in train.parts] == [16, 6, 4]  # 20 - 4, 7 - 1, 5 - 1 held out
    assert [name.split(" ")[0] for name, _ in train.parts] == ["data.path[0]", "data.path[1]", "data.path[2]"]
    assert [len(p) for _, p in ev.parts] == [4, 1, 1]
    assert train.examples[train.rows[-1][0]].where.endswith("c.jsonl:" + train.examples[-1].where.split(":")[-1])
    it = D.BatchIterator(_Rows(len(train)), 5, seed=3)
    epoch = [r for _ in range(it.batches_per_epoch) for r in next(it) if r is not None]
    assert sorted(epoch) == list(range(len(train)))  # an epoch: each row of each source once
    assert {_source_of(train, r) for r in epoch} == {"a.jsonl", "b.jsonl", "c.jsonl"}


def test_weighted_mixture_resumes_at_its_exact_position(files, tok):
    paths = (f"data.path=[{{path: {files / 'a.jsonl'}, weight: 1}}, {{path: {files / 'b.jsonl'}, weight: 2}}, "
             f"{{path: {files / 'c.jsonl'}, weight: 1, format: instruction}}]")
    cfg = load_config(None, [paths, "data.max_length=64", "data.packing=true"])
    train, ev = D.build_datasets(cfg.data, tok, seed=5)
    assert ev is None and np.allclose(train.mixture.p, [0.25, 0.5, 0.25])

    def iterator(ds):
        return D.BatchIterator(ds, 4, seed=5, mixture=ds.mixture)

    whole = iterator(train)
    expected = [next(whole) for _ in range(40)]  # several epochs of the mixture
    first = iterator(train)
    for _ in range(13):
        next(first)
    state = json.loads(json.dumps(first.state()))  # (as the checkpoint's metadata keeps it)
    again, _ = D.build_datasets(cfg.data, tok, seed=5)  # a new process reads the data again
    resumed = iterator(again)
    resumed.restore(state)
    for want in expected[13:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in D.BATCH_KEYS)
    other = load_config(None, [paths.replace("weight: 2", "weight: 3"), "data.max_length=64", "data.packing=true"])
    changed = iterator(D.build_datasets(other.data, tok, seed=5)[0])
    with pytest.raises(D.DataError, match="data mixture"):
        changed.restore(state)


@pytest.mark.parametrize("override, message", [
    ("data.path=[{path: a.jsonl, weight: 1}, {path: b.jsonl, weight: -2}]",
     "data.path[1].weight=-2 must be a number > 0"),
    ("data.path=[{path: a.jsonl, weight: 1}, b.jsonl]", "data.path[1] has no weight while data.path[0] has one"),
    ("data.path=[{path: a.jsonl, wieght: 1}]", "data.path[0]={'path': 'a.jsonl', 'wieght': 1} has unknown key"),
    ("data.eval_path=[{path: a.jsonl, weight: 1}]", "data.eval_path[0].weight=1 is for data.path only"),
])
def test_bad_entries_are_config_errors_naming_the_entry(override, message):
    with pytest.raises(ConfigError, match="^command line: " + message.replace("[", r"\[").replace("{", r"\{")):
        load_config(None, [override])


def test_a_list_is_for_sft_only():
    with pytest.raises(ConfigError, match=r"^command line: data.path=\['a.jsonl', 'b.jsonl'\] may be a list .* "
                                          "train.objective=sft only, not dpo"):
        load_config(None, ["data.path=[a.jsonl,b.jsonl]", "train.objective=dpo"])


_PROBE = "import sys; from jqlora import train; rc = train.main(sys.argv[1:]); print(rc, 'jax' in sys.modules)"


def _train(cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, jax_imported = proc.stdout.split()[-2:]
    return int(rc), jax_imported == "True", proc.stdout, proc.stderr.strip()


def test_cli_missing_source_is_one_line_naming_it(files, assets):
    rc, jax_imported, _, err = _train(files, f"model.path={assets / 'model'}", "output_dir=run",
                                      "data.path=[{path: a.jsonl, weight: 1}, {path: b.jsnol, weight: 1}]")
    assert rc == 2 and not jax_imported and err.splitlines() == [err], err
    assert "data.path[1]=b.jsnol: no such file or directory" in err, err


def test_cli_dry_run_shows_each_source_and_its_share(files, assets):
    rc, _, out, err = _train(files, f"model.path={assets / 'model'}", "output_dir=run", "--dry-run",
                             "data.path=[{path: a.jsonl, weight: 3}, {path: b.jsonl, weight: 1}]",
                             "data.eval_path=[b.jsonl, {path: c.jsonl, format: instruction}]")
    assert rc == 0, err
    lines = out.splitlines()
    assert any(line.startswith("train (2 sources): 27 rows") for line in lines), out
    assert any(line.startswith("  data.path[0] (a.jsonl): 20 rows") and "weight 75.0%: ~20 of an epoch's 27 rows"
               in line for line in lines), out
    assert any(line.startswith("  data.path[1] (b.jsonl): 7 rows") and "weight 25.0%" in line for line in lines), out
    assert any(line.startswith("eval (2 sources): 12 rows") for line in lines), out
    assert any(line.startswith("  data.eval_path[1] (c.jsonl): 5 rows") for line in lines), out
