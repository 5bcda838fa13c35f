"""Several datasets in a training run (issue 28, item 8): a list data.eval_path is evaluated per source.

Oracle: a trainer whose eval set is that one source alone (the same initial adapter, seeded by train.seed): each
eval_loss_<i> equals its eval_loss, and the overall eval_loss is their mean weighted by trained tokens. The trained
run with weighted sources and NEFTune on (a resumed run equal to an uninterrupted one) is checked at the data level
(tests/data/test_mixture.py) and at the train-step level (tests/training/test_neftune.py).
"""

import json

import numpy as np
import pytest

from jqlora.config import load_config
from jqlora.run import Trainer

pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_each_eval_source_has_its_own_loss(assets, tmp_path):
    rows = (assets / "train.jsonl").read_text().splitlines()
    (tmp_path / "x.jsonl").write_text("\n".join(rows[:5]) + "\n")
    (tmp_path / "y.jsonl").write_text("\n".join(rows[5:]) + "\n")

    def trainer(name, eval_path):
        cfg = load_config(None, [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
                                 f"data.eval_path={eval_path}", "data.max_length=48", "lora.r=4",
                                 "train.eval_batch_size=4", f"output_dir={tmp_path / name}"])
        return Trainer(cfg, export=False)

    both = trainer("both", f"[{tmp_path / 'x.jsonl'},{tmp_path / 'y.jsonl'}]")
    try:
        loss = both.evaluate()
        per_source = dict(both.eval_by_source)
        tokens = [p.num_trained_tokens for _, p in both.eval_ds.parts]
        record = {"eval_loss": loss, **both.eval_metrics(loss)}
    finally:
        both.run_dir.close()
    alone = []
    for i, name in enumerate(("x", "y")):
        t = trainer(name, tmp_path / f"{name}.jsonl")
        try:
            alone.append(t.evaluate())
        finally:
            t.run_dir.close()
    assert sorted(per_source) == ["eval_loss_0", "eval_loss_1"]
    np.testing.assert_allclose([per_source["eval_loss_0"], per_source["eval_loss_1"]], alone, rtol=1e-12)
    np.testing.assert_allclose(loss, np.dot(alone, tokens) / sum(tokens), rtol=1e-12)
    assert alone[0] != alone[1] and json.loads(json.dumps(record))["eval_loss_1"] == per_source["eval_loss_1"]
