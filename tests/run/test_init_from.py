"""lora.init_from (jqlora.run.init_from): a run continued from an exported adapter equals one run trained in one go whose
optimizer is made fresh at the boundary; a run continued from a run directory with train.resume_optimizer equals one
uninterrupted run; a directory that cannot start the run is one line, exit 2, before anything is trained.

The tiny Llama of tests/conftest.py; rows are not shuffled and three steps are one epoch, so a second run over the
same data sees the batches the one-go run sees after its boundary. Constant learning rate, no dropout: the step
counter (which a new run restarts) then changes nothing but the optimizer state under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora import parallel
from jqlora import train as T
from jqlora.config import load_config
from jqlora.run import Trainer

SAME = ["train.lr_schedule=constant", "train.warmup_steps=0", "data.shuffle=false", "train.batch_size=4",
        "train.grad_accum_steps=1", "lora.dropout=0", "train.adam_eps=1e-6", "train.learning_rate=5e-3"]


pytestmark = pytest.mark.usefixtures("compilation_cache")  # every trainer here compiles the same step


def _cfg(assets, out, *overrides):
    base = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", "data.max_length=48",
            f"output_dir={out}", "lora.r=4", "train.log_every=1", "train.eval_every=0", *SAME]
    return load_config(None, base + list(overrides))


def _logits(trainer, x):
    return np.asarray(trainer.split.model(trainer.lora)(jnp.asarray(x)))


def _close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=1e-7)


def test_continue_from_adapter_and_from_run(assets, tmp_path):
    x = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)
    first = Trainer(_cfg(assets, tmp_path / "first", "train.max_steps=3"), progress=False)
    assert first.run() == 0  # (exports first/adapter)

    # one go, the optimizer made fresh at the boundary (what continuing from an adapter means)
    ref = Trainer(_cfg(assets, tmp_path / "ref", "train.max_steps=6"), progress=False, export=False)
    one_step = ref.one_step

    def fresh_at_boundary():
        if ref.step == 3:
            ref.opt_state = parallel.shard_optimizer_state(ref.tx.init(ref.lora), ref.lora, ref.mesh)
        return one_step()

    ref.one_step = fresh_at_boundary
    assert ref.run() == 0
    straight = Trainer(_cfg(assets, tmp_path / "straight", "train.max_steps=6"), progress=False, export=False)
    assert straight.run() == 0
    # (the invariants below can fail: the optimizer state at the boundary changes the result)
    assert np.abs(_logits(ref, x) - _logits(straight, x)).max() > 1e-3

    again = Trainer(_cfg(assets, tmp_path / "again", "train.max_steps=3",
                           f"lora.init_from={tmp_path / 'first' / 'adapter'}"), progress=False, export=False)
    assert again.run() == 0
    _close(again.lora, ref.lora)
    np.testing.assert_allclose(_logits(again, x), _logits(ref, x), atol=1e-5, rtol=0)

    # a run directory: its latest checkpoint's adapters, and with resume_optimizer its optimizer state too
    fresh = Trainer(_cfg(assets, tmp_path / "fresh", "train.max_steps=3", f"lora.init_from={tmp_path / 'first'}"),
                      progress=False, export=False)
    assert fresh.run() == 0
    _close(fresh.lora, ref.lora)
    cont = Trainer(_cfg(assets, tmp_path / "cont", "train.max_steps=3", "train.resume_optimizer=true",
                          f"lora.init_from={tmp_path / 'first' / 'checkpoints' / '3'}"), progress=False, export=False)
    assert cont.run() == 0
    _close(cont.lora, straight.lora)
    np.testing.assert_allclose(_logits(cont, x), _logits(straight, x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def adapter_run(assets, tmp_path_factory):
    """A finished 1-step run (r=4) with its exported adapter."""
    out = tmp_path_factory.mktemp("src") / "run"
    assert Trainer(_cfg(assets, out, "train.max_steps=1"), progress=False).run() == 0
    return out


@pytest.mark.parametrize("init, extra, expect", [
    ("{tmp}/missing", "", "lora.init_from={tmp}/missing: no such directory"),
    ("{tmp}", "", "neither a peft adapter directory"),
    ("{run}/adapter", "lora.r=8", "lora_A.weight has shape (4, 128), expected (8, 128)"),
    ("{run}/adapter", "lora.alpha=8", "has LoRA scaling 8 in the adapter"),
    ("{run}/adapter", "train.resume_optimizer=true", "is a peft adapter, which holds no optimizer state"),
    ("{run}", "lora.r=8", "that run has lora.r=4, this run lora.r=8"),
    ("{run}", "lora.targets=[q_proj]", "that run has lora.targets='all-linear'"),
])
def test_bad_init_from_is_one_line(assets, adapter_run, tmp_path, capsys, init, extra, expect):
    init, expect = (s.format(tmp=tmp_path, run=adapter_run) for s in (init, expect))
    args = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", "data.max_length=48",
            f"output_dir={tmp_path / 'out'}", "lora.r=4", "train.max_steps=1", f"lora.init_from={init}"]
    assert T.main(["--no-progress", *args, *extra.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained, nothing saved
