"""Wall time from a fresh `python -m jqlora.X` to its one-line error for the data and adapter mistakes of issue 28
(items 1 and 2; the target is < 3 s): a mistyped data path, an empty or malformed data file, a wrong-shape adapter
in `generate`, and a Hub dataset name on a machine that cannot reach the Hub.

    python tools/early_errors.py [--repeat 3]

Prints the best of `--repeat` runs per case with its exit code and error line. (Timing is measured here, never
asserted in a test.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"


def _files(root: Path) -> None:
    good = (DEMO / "chat.jsonl").read_text().splitlines()
    (root / "empty.jsonl").write_text("\n")
    (root / "bad.jsonl").write_text("\n".join([good[0], good[1], '{"messages": [', *good[2:50]]) + "\n")
    model = root / "model"  # a base's config.json (the check reads nothing else of it)
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}))
    from safetensors.numpy import save_file

    adapter = root / "adapter"  # peft's layout, made for a 96-wide model
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    save_file({key.format(i, ab): np.zeros(shape, np.float32) for i in range(2)
               for ab, shape in (("A", (4, 96)), ("B", (96, 4)))}, str(adapter / "adapter_model.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _files(root)
        train = ["-m", "jqlora.train", f"model.path={DEMO / 'model'}", f"output_dir={root / 'run'}"]
        cases = {
            "train data.path=chat.jsnol": train + ["data.path=chat.jsnol"],
            "train empty.jsonl": train + [f"data.path={root / 'empty.jsonl'}"],
            "train malformed line 3": train + [f"data.path={root / 'bad.jsonl'}"],
            "generate wrong-shape adapter": ["-m", "jqlora.generate", "--model", str(root / "model"), "--adapter",
                                             str(root / "adapter"), "--prompt", "hi"],
            "train --dry-run hub name, no network": train + ["data.path=someone/some-data", "--dry-run"],
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(root / "hf")}  # (a Hub that refuses at once)
        for name, cmd in cases.items():
            best, proc = float("inf"), None
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, *cmd], cwd=root, env=env, capture_output=True, text=True)
                best = min(best, time.perf_counter() - t0)
            line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
            print(f"{name:38s} {best:6.2f} s  (exit {proc.returncode}) {line.replace(tmp, '<tmp>')[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
