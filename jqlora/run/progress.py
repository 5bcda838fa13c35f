"""The lines a run logs while it trains: progress (loss, learning rate, throughput, time left) and evaluations."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(rec: dict, total_steps: int, eta_s: float) -> str:
    """``step 10/100 loss 2.3456 lr 1.00e-03 grad_norm 0.532 tok/s 4100 trained_tokens 12345 eta 1m20s``."""
    grad = rec.get("grad_norm")
    return (f"step {rec['step']}/{total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
            f"grad_norm {'?' if grad is None else f'{grad:.3f}'} tok/s {rec['tokens_per_s']:.0f} "
            f"trained_tokens {rec['trained_tokens']} eta {format_duration(eta_s)}")


def eval_line(rec: dict) -> str:
    parts = [f"eval step {rec['step']}: loss {rec['eval_loss']:.4f}"]
    if "eval_perplexity" in rec:
        parts.append(f"perplexity {rec['eval_perplexity']:.3f}")
    if rec.get("eval_accuracy") is not None:
        parts.append(f"token accuracy {rec['eval_accuracy']:.4f}")
    by_source = [f"{rec[k]:.4f}" for k in sorted((k for k in rec if k.startswith("eval_loss_")),
                                                 key=lambda k: int(k.rsplit("_", 1)[1]))]
    if by_source:  # (several eval sources: eval_loss_0, eval_loss_1, ...)
        parts.append("loss per source " + " | ".join(by_source))
    return ", ".join(parts)
