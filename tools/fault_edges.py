"""The fault battery's second round (issue 27): a save that fails or hangs, the lock through a symlink, a torn
metrics line, damaged or half-written init_state/, overwrite onto what the run reads, export while training, modes
of outputs, and one-line errors at the edges (a NaN embedding, a dataset that is not UTF-8, absurd adapter configs,
a malicious .bin, a CLI run from the checkout's parent folder, a run that collapses in a few steps).

``FAST``: the cases that need no long run (a CI smoke runs them once: ``--only fast``)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from fault_common import REPO, case, cli, digest, one_error, poisoned_copy

FAST = ("utf8_dataset", "absurd_adapter_configs", "malicious_bin", "codebooks_from_parent", "overwrite_reads")

# A trainer whose orbax save fails (raise) or never finishes (hang), from inside orbax's background thread
# (tests/run/test_faults_edges.py runs it too).
SAVE_FAULT = """
import asyncio, sys
from orbax.checkpoint._src.path import atomicity
mode = sys.argv.pop(1)
async def finalize(self, *a, **k):
    if mode == "hang":
        await asyncio.sleep(3600)
    raise FileNotFoundError(2, "No such file or directory", str(self.get()))
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from jqlora.train import main
sys.exit(main(sys.argv[1:]))
"""


class EdgeCases:
    """Mixed into the battery (it gives ``work``, ``model``, ``data``, ``args``, ``train``, ``reference``,
    ``same_as_reference``)."""

    def save_failure(self):
        for mode in ("raise", "hang"):
            case(f"an orbax save that {'fails' if mode == 'raise' else 'never finishes'}: exits within 60 s, one "
                 "line, non-zero")(lambda m=mode: self._save_failure(m))()

    def _save_failure(self, mode: str) -> str | None:
        out = self.work / f"save-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.Popen([sys.executable, "-c", SAVE_FAULT, mode, "--no-progress", *self.args,
                              f"output_dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO), "JQLORA_SAVE_TIMEOUT_S": "10"})
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in p.stderr),
                                  daemon=True)
        reader.start()
        try:
            p.wait(timeout=900)
        except subprocess.TimeoutExpired:
            return "hung"
        finally:
            p.kill()
        ended = time.monotonic()
        reader.join(10)
        saving = next((t for t, ln in lines if "step 1/" in ln), None)  # (logged just before the first save)
        r = subprocess.CompletedProcess(p.args, p.returncode, "", "".join(ln for _, ln in lines))
        why = one_error(r, "checkpoint")
        if why or saving is None:
            return why or "no step logged"
        return f"exited {ended - saving:.0f} s after the save began" if ended - saving > 60 else None

    @case("two trainers through a symlinked name: the second is refused, no step is logged twice")
    def symlink_lock(self):
        real, link = self.work / "real-run", self.work / "link-run"
        shutil.rmtree(real, ignore_errors=True)
        link.unlink(missing_ok=True)
        real.mkdir()
        link.symlink_to(real)
        p = subprocess.Popen([sys.executable, "-m", "jqlora.train", "--no-progress", *self.args,
                              "train.max_steps=100000", f"output_dir={real}"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        try:
            t0 = time.time()
            while time.time() - t0 < 600 and not (real / "checkpoints").is_dir():
                time.sleep(0.2)
            why = one_error(self.train(link, "train.max_steps=100000"), "in use by another trainer")
        finally:
            p.kill()
            p.communicate()
        steps = [json.loads(x)["step"] for x in (real / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return why or (None if steps == sorted(set(steps)) else "a step was logged twice")

    @case("a torn last line in metrics.jsonl (disk full / kill mid-append): the run resumes = uninterrupted run")
    def torn_metrics(self):
        stopped = self._stopped()
        out = self.work / "torn"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(stopped, out)
        with open(out / "metrics.jsonl", "ab") as f:
            f.write(b'{"step": 7, "loss": 1.')
        r = self.train(out)
        if r.returncode != 0 or "Traceback" in r.stderr:
            return f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        return self.same_as_reference(out)

    @case("64 flipped bytes in init_state/ (LoftQ): resume recomputes it with a warning; a kill's partial is ours")
    def init_state_damage(self):
        out = self.work / "loftq"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / f".init_state.partial-{os.uname().nodename}-{2**22 + 7}-zz").mkdir()  # (a killed first try)
        loftq = ("lora.init=loftq", "lora.loftq_iters=1")
        r = self.train(out, *loftq, "train.stop_at_step=2")
        if r.returncode != 0:
            return f"the start after a killed init_state write: exit {r.returncode}"
        f = out / "init_state" / "model.safetensors"
        b = bytearray(f.read_bytes())
        b[-64:] = bytes(x ^ 0xFF for x in b[-64:])
        f.write_bytes(bytes(b))
        r = self.train(out, *loftq, "train.max_steps=4")
        if r.returncode != 0:
            return f"resume: exit {r.returncode}"
        return None if "does not match its checksum" in r.stderr and "computed again" in r.stderr else "not said"

    @case("train.overwrite=true onto the model's or the data's folder: refused in one line, nothing moves")
    def overwrite_reads(self):
        own = self.work / "own"
        shutil.rmtree(own, ignore_errors=True)
        shutil.copytree(self.model, own / "model")
        (own / "data").mkdir()
        shutil.copy(self.data, own / "data" / "chat.jsonl")
        (own / "data" / "unrelated.csv").write_text("a,b\n")
        before = {d: digest(own / d) for d in ("model", "data")}
        args = [a for a in self.args if not a.startswith(("model.path=", "data.path="))]
        args += [f"model.path={own / 'model'}", f"data.path={own / 'data' / 'chat.jsonl'}", "train.overwrite=true"]
        for target, key in (("model", "model.path"), ("data", "data.path")):
            why = one_error(cli("train", "--no-progress", *args, f"output_dir={own / target}"), key, "nothing")
            if why:
                return f"{target}: {why}"
        return None if {d: digest(own / d) for d in before} == before and sorted(p.name for p in own.iterdir()
                                                         if not p.name.endswith(".lock")) == ["data", "model"] \
            else "something moved"

    @case("export while the run trains (rotation keep=1): every export succeeds")
    def export_while_training(self):
        out = self.work / "live"
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.Popen([sys.executable, "-m", "jqlora.train", "--no-progress", *self.args,
                              "train.max_steps=100000", "train.keep_checkpoints=1", f"output_dir={out}"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t0 = time.time()
            while time.time() - t0 < 600 and not (out / "checkpoints").is_dir():
                time.sleep(0.2)
            for i in range(4):
                r = cli("export", out, self.work / f"live-adapter-{i}")
                if r.returncode != 0:
                    return f"try {i}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        finally:
            p.kill()
            p.communicate()
        return None

    @case("outputs honour the umask (022): an exported adapter is 0755 / 0644")
    def umask(self):
        dst = self.work / "umask-adapter"
        shutil.rmtree(dst, ignore_errors=True)
        r = subprocess.run(["sh", "-c", f"umask 022 && {sys.executable} -m jqlora.export {self.reference()} {dst}"],
                           cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            return f"exit {r.returncode}"
        modes = {stat.S_IMODE(p.stat().st_mode) for p in [dst, *dst.rglob("*")]}
        return None if modes == {0o755, 0o644} else f"modes {sorted(map(oct, modes))}"

    @case("a NaN in the embedding (not quantized): one line naming file and key")
    def nan_embedding(self):
        key = "model.embed_tokens.weight"
        bad = poisoned_copy(self.model, self.work / "nan-embed", key, (3, 1))
        args = [a for a in self.args if not a.startswith("model.path=")]
        return one_error(cli("train", "--no-progress", *args, f"model.path={bad}",
                             f"output_dir={self.work / 'nan-embed-run'}"), "model.safetensors", key, "NaN")

    @case("invalid UTF-8 in a dataset: one line with file and line")
    def utf8_dataset(self):
        data = self.work / "latin1.jsonl"
        rows = self.data.read_text().splitlines()[:3]
        data.write_bytes(("\n".join(rows) + "\n").encode() + b'{"text": "caf\xe9"}\n')
        args = [a for a in self.args if not a.startswith("data.path=")]
        return one_error(cli("train", "--no-progress", *args, f"data.path={data}",
                             f"output_dir={self.work / 'utf8-run'}"), f"{data}:4", "UTF-8")

    @case("adapter configs with r / lora_alpha Infinity or NaN: generate says one line")
    def absurd_adapter_configs(self):
        for key, value in (("r", "Infinity"), ("lora_alpha", "Infinity"), ("lora_alpha", "NaN")):
            d = self.work / f"absurd-{key}-{value}"
            d.mkdir(exist_ok=True)
            cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                   "target_modules": ["q_proj"], "base_model_name_or_path": str(self.model), key: "@"}
            (d / "adapter_config.json").write_text(json.dumps(cfg).replace('"@"', value))
            why = one_error(cli("generate", "--model", self.model, "--adapter", d, "--prompt", "hi",
                                "--max-new-tokens", "2"), key, "adapter_config.json")
            if why:
                return f"{key}={value}: {why}"
        return None

    @case("a malicious .bin on convert: one short line, no advice to load it unsafely")
    def malicious_bin(self):
        d = self.work / "evil-model"
        d.mkdir(exist_ok=True)
        shutil.copy(self.model / "config.json", d / "config.json")
        code = ("import os, sys, torch\nclass E:\n    def __reduce__(self): return (os.system, ('touch pwned',))\n"
                "torch.save({'model.embed_tokens.weight': E()}, sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(d / "pytorch_model.bin")], check=True)
        r = cli("convert", d, self.work / "evil-out", cwd=self.work)
        why = one_error(r, "pytorch_model.bin", "refused")
        if why:
            return why
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith("error:"))
        if "weights_only=False" in line or len(line.replace(str(d), "")) > 300:  # (the path's length is the user's)
            return f"the line: {line!r}"
        return "the pickle ran" if (self.work / "pwned").exists() else None

    @case("a CLI run from the folder that holds the checkout: the codebooks are found")
    def codebooks_from_parent(self):
        r = cli("convert", self.model, self.work / "from-parent", cwd=REPO.parent)
        return None if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"

    @case("a run that collapses in 12 steps (lr 1e4): non-zero exit naming the last good checkpoint, no adapter")
    def short_collapse(self):
        out = self.work / "collapse"
        shutil.rmtree(out, ignore_errors=True)
        args = [a for a in self.args if "learning_rate" not in a]
        why = one_error(cli("train", "--no-progress", *args, "train.learning_rate=1e4", "train.max_steps=12",
                            f"output_dir={out}"), "last good checkpoint")
        return why or ("an adapter was exported" if (out / "adapter").exists() else None)

    def _stopped(self) -> Path:
        stopped = self.work / "stopped"
        if not stopped.exists():
            r = self.train(stopped, "train.stop_at_step=6")
            assert r.returncode == 0, r.stderr
        return stopped
