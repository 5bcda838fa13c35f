"""A run with train.memory=min (issue 25): the trainer holds the embedding and lm_head 4-bit, trains, and its export is
the ordinary peft adapter (the adapter does not depend on the mode): peft loads it onto the float base and gives the
logits of the restored model, which export rebuilds in the default mode (full-precision embedding and head)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora import export as E
from jqlora.config import load_config
from jqlora.run import Trainer, restore_for_export


def test_min_mode_trains_and_exports(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = load_config(None, [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
                             "data.max_length=48", f"output_dir={out}", "lora.r=4", "train.log_every=1",
                             "train.eval_every=0", "train.warmup_steps=1", "train.learning_rate=1e-2",
                             "model.quant=none", "train.max_steps=2", "train.memory=min"])
    trainer = Trainer(cfg, progress=False)
    embed = trainer.model.model.embed_tokens
    assert embed.weight is None and embed.quantized().quant_type == "nf4"  # held 4-bit while training
    assert trainer.model.lm_head.weight is None
    assert trainer.run() == 0
    model, _, step = restore_for_export(out)
    assert step == 2 and model.lm_head.weight is not None  # export's model: the default mode
    assert E.main([str(out), str(tmp_path / "adapter")]) == 0
    x = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)
    want = np.asarray(model(jnp.asarray(x)))
    base = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(torch.from_numpy(x).long()).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(want - plain(torch.from_numpy(x).long()).logits.numpy()).max() > 1e-4  # (it trained)


@pytest.mark.parametrize("override, says", [("train.objective=grpo", "train.objective=grpo")])
def test_min_mode_refuses_grpo_in_one_line(override, says):
    from jqlora.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.memory=min", override])
    assert says in str(e.value) and len(str(e.value).splitlines()) == 1
