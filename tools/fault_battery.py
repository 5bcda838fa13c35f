"""Fault battery: what a crash, a corrupt file, a full disk, a second trainer or a bad learning rate does to a run.

    python tools/fault_battery.py [--kills 4] [--workdir DIR] [--only GROUP,...]

Every case runs the real CLIs (`python -m jqlora.train / convert / export / generate`) in fresh processes on the
demo model (tools/make_demo_model.py, built on first use) and a small slice of the demo chat set, and checks what a
user would: the exit code, no traceback, one line naming the culprit, and nothing lost (older checkpoints and
outputs byte-identical; a run continued after a crash ends where an uninterrupted one does). It prints one line per
case and "N/M cases held" last. The disk-full cases need a tmpfs (root); without one they report as not held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_common import DEMO, REPO, RESULTS, case, cli, digest, one_error, poisoned_copy, popen  # noqa: E402
from fault_edges import FAST, EdgeCases  # noqa: E402


class Battery(EdgeCases):
    def __init__(self, work: Path, kills: int):
        self.work, self.kills = work, kills
        self.model = DEMO / "model"
        if not (self.model / "model.safetensors").is_file():
            sys.path.insert(0, str(REPO / "tools"))
            import make_demo_model

            make_demo_model.build(str(self.model))
        rows = (DEMO / "chat.jsonl").read_text().splitlines()[:64]
        self.data = work / "chat.jsonl"
        self.data.write_text("\n".join(rows) + "\n")
        self.args = [f"model.path={self.model}", f"data.path={self.data}", "data.eval_path=null", "lora.r=4",
                     "lora.dropout=0.0", "train.batch_size=4", "train.grad_accum_steps=1", "train.max_steps=12",
                     "train.log_every=1", "train.eval_every=0", "train.save_every=1", "train.keep_checkpoints=3",
                     "train.sample_prompt=null", "train.warmup_steps=1", "model.dtype=float32"]

    def train(self, out: Path, *extra, timeout: int = 900) -> subprocess.CompletedProcess:
        return cli("train", "--no-progress", *self.args, f"output_dir={out}", *extra, timeout=timeout)

    def reference(self) -> Path:
        out = self.work / "reference"
        if not out.exists():
            r = self.train(out)
            assert r.returncode == 0, r.stderr
        return out

    @staticmethod
    def adapter_of(out: Path) -> dict[str, str]:
        return digest(out / "adapter")

    @staticmethod
    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    def same_as_reference(self, out: Path) -> str | None:
        ref = self.reference()
        a, b = self.losses(out), self.losses(ref)
        if sorted(a) != sorted(b):
            return f"logged steps {sorted(a)} != {sorted(b)}"
        worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in b)
        if worst > 1e-6:
            return f"losses differ by {worst:.2e}"
        from safetensors.numpy import load_file

        x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, ref))
        worst = max(float(abs(x[k] - y[k]).max()) for k in y)
        return None if worst <= 1e-6 else f"adapters differ by {worst:.2e}"

    # -- cases --------------------------------------------------------------------------------------------------

    @case("kill -9 during training and checkpoint writes, restart until done = uninterrupted run")
    def kill_training(self):
        out = self.work / "killed-train"
        rng = random.Random(0)
        for i in range(self.kills):
            p = popen("train", "--no-progress", *self.args, f"output_dir={out}")
            t0 = time.time()
            while time.time() - t0 < 600 and not (out / "checkpoints").is_dir():
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 3.0))
            p.send_signal(signal.SIGKILL)
            p.communicate()
        r = self.train(out)
        if r.returncode != 0:
            return f"final restart exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        return self.same_as_reference(out)

    @case("kill -9 during convert: never a DST that looks complete; a re-run gives the same bytes")
    def kill_convert(self):
        ref = self.work / "converted-ref"
        if cli("convert", self.model, ref).returncode != 0:
            return "reference convert failed"
        rng = random.Random(1)
        dst = self.work / "converted"
        for _ in range(self.kills):
            p = popen("convert", self.model, dst)
            time.sleep(rng.uniform(0.5, 6.0))
            p.send_signal(signal.SIGKILL)
            p.communicate()
            if dst.exists() and digest(dst) != digest(ref):
                return "a killed convert left a DST that differs from a complete one"
            if dst.exists():
                shutil.rmtree(dst)
        r = cli("convert", self.model, dst)
        if r.returncode != 0:
            return f"re-run exit {r.returncode}"
        if digest(dst) != digest(ref):
            return "the re-run's bytes differ"
        left = [p.name for p in dst.parent.iterdir() if p.name.startswith(".converted.partial-")]
        return f"leftovers {left}" if left else None

    @case("kill -9 during export --merge: never a DST that looks complete; a re-run gives the same bytes")
    def kill_merge(self):
        run = self.reference()
        ref = self.work / "merged-ref"
        if cli("export", run, ref, "--merge").returncode != 0:
            return "reference merge failed"
        rng = random.Random(2)
        dst = self.work / "merged"
        for _ in range(self.kills):
            p = popen("export", run, dst, "--merge")
            time.sleep(rng.uniform(0.5, 6.0))
            p.send_signal(signal.SIGKILL)
            p.communicate()
            if dst.exists() and digest(dst) != digest(ref):
                return "a killed merge left a DST that differs from a complete one"
            if dst.exists():
                shutil.rmtree(dst)
        r = cli("export", run, dst, "--merge")
        if r.returncode != 0:
            return f"re-run exit {r.returncode}"
        return None if digest(dst) == digest(ref) else "the re-run's bytes differ"

    def _corrupt(self, name: str, corrupt) -> str | None:
        stopped = self._stopped()
        out = self.work / f"corrupt-{name}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(stopped, out)
        corrupt(out / "checkpoints" / "6")
        bad = digest(out / "checkpoints" / "6")
        older = {s: digest(out / "checkpoints" / s) for s in ("4", "5")}
        r = self.train(out)
        if r.returncode != 0 or "Traceback" in r.stderr:
            return f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:") and "checkpoints/6" in ln]
        if len(warns) != 1:
            return f"{len(warns)} warnings naming checkpoints/6"
        kept = list((out / "checkpoints.bad").iterdir())
        if len(kept) != 1 or digest(kept[0]) != bad:
            return "the bad checkpoint was not kept as it was"
        if any(digest(out / "checkpoints" / s) != h for s, h in older.items() if (out / "checkpoints" / s).is_dir()):
            return "an older checkpoint changed"
        return self.same_as_reference(out)

    def corruption_cases(self):
        def array_file(d: Path) -> Path:
            files = [p for p in (d / "state").rglob("*") if p.is_file() and "ocdbt" not in p.name
                     and not p.name.startswith("_")]
            return max(files, key=lambda p: p.stat().st_size)

        def flip(d):
            f = array_file(d)
            b = bytearray(f.read_bytes())
            b[len(b) // 2:len(b) // 2 + 64] = bytes(x ^ 0xFF for x in b[len(b) // 2:len(b) // 2 + 64])
            f.write_bytes(bytes(b))

        kinds = {
            "manifest deleted": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
            "array file truncated": lambda d: array_file(d).write_bytes(array_file(d).read_bytes()[:100]),
            "meta/metadata cut mid-JSON": lambda d: (d / "meta" / "metadata").write_text(
                (d / "meta" / "metadata").read_text()[:10]),
            "64 bytes flipped in an array file": flip,
            "checksums missing (save cut short)": lambda d: (d / "CHECKSUMS").unlink(),
            "_CHECKPOINT_METADATA deleted": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
        }
        for name, fn in kinds.items():
            case(f"corrupt latest checkpoint ({name}): one warning, resumes from the previous, nothing lost")(
                lambda n=name, f=fn: self._corrupt(re.sub(r"\W+", "-", n), f))()

    @case("two trainers on one output_dir: the second exits at once naming PID and host; a stale lock is taken over")
    def concurrent(self):
        out = self.work / "shared"
        long = ["train.max_steps=100000"]
        p = subprocess.Popen([sys.executable, "-m", "jqlora.train", "--no-progress", *self.args, *long,
                              f"output_dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            t0 = time.time()
            while time.time() - t0 < 600 and not (out / "checkpoints").is_dir():
                time.sleep(0.2)
            r = self.train(out, *long)
            why = one_error(r, "in use by another trainer", f"PID {p.pid}", socket.gethostname())
            if why:
                return why
        finally:
            p.send_signal(signal.SIGKILL)
            p.communicate()
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        if steps != sorted(set(steps)):
            return "a step was logged twice"
        from jqlora.run import RunDir

        latest = RunDir(out, create=False).latest_step()
        r = self.train(out, *long, f"train.stop_at_step={latest + 1}")
        if r.returncode != 0 or "took over the stale lock" not in r.stderr:
            return f"stale lock not taken over (exit {r.returncode})"
        return None

    def _tmpfs(self, name: str, mib: int) -> Path | None:
        d = self.work / name
        d.mkdir(exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(d)],
                            capture_output=True).returncode == 0
        return d if ok else None

    @staticmethod
    def _fill(d: Path, leave: int) -> None:
        free = shutil.disk_usage(d).free - leave
        with open(d / "filler", "wb") as f:
            while free > 0:
                n = min(free, 1 << 20)
                try:
                    f.write(b"\0" * n)
                except OSError:
                    break
                free -= n

    @case("disk full (tmpfs): checkpoint, convert, export and merge each say one line; nothing lost or half-written")
    def disk_full(self):
        d = self._tmpfs("disk", 64)
        if d is None:
            return "cannot mount a tmpfs here (not root?)"
        try:
            stopped = self._stopped()
            out = d / "run"
            shutil.copytree(stopped, out)
            self._fill(d, 32 << 10)
            before = digest(out / "checkpoints")
            for r, needles in (
                (self.train(out), ("checkpoint", "free")),
                (cli("convert", self.model, d / "converted"), ("converted", "free")),
                (cli("export", out, d / "adapter"), ("adapter", "free")),
                (cli("export", out, d / "merged", "--merge"), ("merged", "free")),
            ):
                why = one_error(r, *needles)
                if why:
                    return why
            if digest(out / "checkpoints") != before:
                return "earlier checkpoints changed"
            left = [p.name for p in d.iterdir() if p.name not in ("run", "filler", ".run.lock")]  # (the run's lock)
            return f"left behind: {left}" if left else None
        finally:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)

    @case("a NaN in a quantized base weight: one line naming file and key on train, convert, generate, export")
    def nan_weight(self):
        key = "model.layers.0.self_attn.q_proj.weight"
        bad = poisoned_copy(self.model, self.work / "nan-model", key, (0, 7))
        adapter = self.reference() / "adapter"
        args = [a for a in self.args if not a.startswith("model.path=")]
        for r in (cli("train", "--no-progress", *args, f"model.path={bad}", f"output_dir={self.work / 'nan-run'}"),
                  cli("convert", bad, self.work / "nan-converted"),
                  cli("generate", "--model", bad, "--prompt", "hi", "--max-new-tokens", "2"),
                  cli("export", adapter, self.work / "nan-merged", "--merge", "--base", bad)):
            why = one_error(r, "model.safetensors", key)
            if why:
                return why
        return None

    @case("a diverging run (lr=1e4): exit non-zero, one line naming the last good checkpoint, nothing exported")
    def divergence(self):
        out = self.work / "diverge"
        args = [a for a in self.args if "learning_rate" not in a]
        r = cli("train", "--no-progress", *args, "train.learning_rate=1e4", "train.max_steps=40",
                f"output_dir={out}")
        why = one_error(r, "last good checkpoint")
        if why:
            return why
        return "an adapter was exported" if (out / "adapter").exists() else None

    @case("leftover .partial-* directories of a killed convert are removed by the next run, which says so")
    def leftovers(self):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        dst = self.work / "conv2"
        left = self.work / f".conv2.partial-{socket.gethostname()}-{dead.pid}-zzz"
        left.mkdir()
        r = cli("convert", self.model, dst)
        if r.returncode != 0:
            return f"exit {r.returncode}"
        if left.exists():
            return "not removed"
        return None if "removed 1 leftover" in r.stderr else "not said"


GROUPS = ("kill_training", "kill_convert", "kill_merge", "corruption_cases", "concurrent", "disk_full", "nan_weight",
          "divergence", "leftovers", "save_failure", "symlink_lock", "torn_metrics", "init_state_damage",
          "overwrite_reads", "export_while_training", "umask", "nan_embedding", "utf8_dataset",
          "absurd_adapter_configs", "malicious_bin", "codebooks_from_parent", "short_collapse")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=4, help="kill -9 repetitions per killed command")
    ap.add_argument("--workdir", default=None, help="where to run (default: a new temporary directory)")
    ap.add_argument("--only", default=None, help="run only the groups whose method name contains this, or 'fast' "
                    "for the quick ones; several, comma-separated (the CI smoke: --kills 1 --only "
                    "kill,fast,disk_full): " + ", ".join(GROUPS))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jqlora-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"fault battery in {work}", flush=True)
    b = Battery(work, args.kills)
    wanted = None if args.only is None else [w.strip() for w in args.only.split(",") if w.strip()]
    for name in GROUPS:
        if wanted is None or any(name in FAST if w == "fast" else w in name for w in wanted):
            getattr(b, name)()
    held = sum(ok for _, ok, _ in RESULTS)
    print(f"{held}/{len(RESULTS)} cases held")
    return 0 if held == len(RESULTS) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
