"""`python -m jqlora.generate`: text from a model (and adapter) with KV-cache decoding (`jqlora.models.decode`).

    python -m jqlora.generate --model DIR [--adapter DIR] --prompt "..." [--system "..."]   # one chat turn
    python -m jqlora.generate --model DIR --prompt "..." --raw      # the prompt as it is, no chat template
    python -m jqlora.generate --model DIR --chat [--system "..."]   # user turns from stdin

A prompt goes through the tokenizer's chat template (with `--system` as the system turn) unless `--raw`, as it does
in training. JAX is imported only after the arguments are parsed, so `--help` and argument errors are instant.
The decoding functions (`generate`, `generate_stream`, ...) live in `jqlora.models.decode`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
from collections.abc import Sequence

# peft's file names and key layout (`jqlora.adapters.format`, repeated here: that wing imports JAX)
_ADAPTER_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?"
                          r"\.weight$")


class UsageError(Exception):
    """A user's mistake: printed as one line, exit status 2."""


_FUSED = ("phi3",)  # model types with fused qkv_proj / gate_up_proj


def _linear_shapes(config_path: str) -> tuple[int, dict[str, tuple[int, int]], bool]:
    """(layers, {module: (out, in)}, whether the MLP is MoE) of a decoder's linears from its config.json."""
    try:
        with open(config_path, encoding="utf-8") as f:
            c = json.load(f)
        c = c.get("text_config") or c if "hidden_size" not in c else c
        D, N, F, L = (int(c[k]) for k in ("hidden_size", "num_attention_heads", "intermediate_size",
                                          "num_hidden_layers"))
        K, H = int(c.get("num_key_value_heads") or N), int(c.get("head_dim") or D // N)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0, {}, True  # (not a config we can read: the full load says what is wrong)
    moe = bool(c.get("num_local_experts") or c.get("num_experts"))
    if c.get("model_type") in _FUSED:
        shapes = {"qkv_proj": ((N + 2 * K) * H, D), "o_proj": (D, N * H), "gate_up_proj": (2 * F, D),
                  "down_proj": (D, F)}
    else:
        shapes = {"q_proj": (N * H, D), "k_proj": (K * H, D), "v_proj": (K * H, D), "o_proj": (D, N * H),
                  "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    if moe:  # (the experts' and the router's shapes are the full load's to check)
        shapes = {k: v for k, v in shapes.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")}
    return L, shapes, moe


_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}


def check_adapter(model_dir: str, adapter_dir: str) -> None:
    """The adapter's config and its LoRA shapes (from the safetensors header, no weights read) against the base's
    config.json, in seconds and before JAX: `UsageError` naming the file and key."""
    config = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        inner = os.path.join(adapter_dir, "adapter")  # (a run directory: its final adapter is there)
        hint = f"; its run's adapter is {inner}" if os.path.isfile(os.path.join(inner, "adapter_config.json")) else ""
        raise UsageError(f"{config}: missing; {adapter_dir} is not a peft adapter directory{hint}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{config}: cannot read JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UsageError(f"{config}: peft_type {got!r} is not supported; jqlora reads LORA adapters only")
    for key, integer in (("r", True), ("lora_alpha", False)):  # (the config before the weights: its own mistakes)
        value = cfg.get(key)
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0
                or (integer and not float(value).is_integer())):
            raise UsageError(f"{config}: {key} must be a positive finite {'integer' if integer else 'number'}, "
                             f"got {value!r}")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            return  # (a legacy pickle: its shapes need torch, the full load checks them)
        raise UsageError(f"{weights}: missing (no adapter weights in {adapter_dir})")
    try:
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n < os.path.getsize(weights) else None
        if not isinstance(header, dict):
            raise ValueError("not a safetensors header")
    except (OSError, ValueError, struct.error) as e:
        raise UsageError(f"{weights}: cannot read adapter weights ({e})") from None
    layers, shapes, moe = _linear_shapes(os.path.join(model_dir, "config.json"))
    ranks: dict[tuple[str, str], int] = {}
    for key, info in sorted(header.items()):
        m = _ADAPTER_KEY.match(key)
        shape = tuple(info.get("shape", ())) if isinstance(info, dict) else ()
        if m is not None and shapes and not moe and m[2] in _LINEARS and m[2] not in shapes:
            raise UsageError(f"{weights}: {key}: {model_dir} has no {m[2]} (its linears: {', '.join(shapes)}); an "
                             "adapter for another architecture?")
        if m is None or m[2] not in shapes:
            continue
        layer, module, ab = int(m[1]), m[2], m[3]
        if layer >= layers:
            raise UsageError(f"{weights}: {key}: layer {layer}, but {model_dir} has {layers} layers (an adapter for "
                             "another model?)")
        out, inp = shapes[module]
        r = ranks.setdefault((m[1], module), shape[0] if ab == "A" and shape else shape[-1] if shape else 0)
        expected = (r, inp) if ab == "A" else (out, r)
        if shape != expected:
            raise UsageError(f"{weights}: {key} has shape {shape}, expected {expected} for {model_dir} (an adapter "
                             "for another model?)")


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` rendered by the chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jqlora.generate", description="Generate text with KV-cache decoding.")
    p.add_argument("--model", required=True, help="Hugging Face or jqlora model directory")
    p.add_argument("--adapter", help="peft LoRA adapter directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one user turn, sent through the chat template (unless --raw)")
    mode.add_argument("--chat", action="store_true", help="read user turns from stdin, apply the chat template")
    p.add_argument("--raw", action="store_true", help="with --prompt: send the text as it is, no chat template")
    p.add_argument("--system", help="a system turn before the user's (chat template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    return p


def _stream_text(model, tokenizer, prompt_ids: list[int], args, eos: list[int], out) -> list[int]:
    """Generate from ``prompt_ids``, writing the decoded text to ``out`` as it grows; returns the new tokens."""
    new: list[int] = []
    shown = ""
    from jqlora.models.decode import generate_stream

    for tok in generate_stream(model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, eos_token_id=eos or None, seed=args.seed):
        t = int(tok[0])
        if t in eos:
            break
        new.append(t)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for a complete multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if text.startswith(shown):
        out.write(text[len(shown):])
    out.write("\n")
    out.flush()
    return new


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    try:
        if not os.path.isdir(args.model):
            raise UsageError(f"--model {args.model}: not a directory")
        if args.adapter is not None and not os.path.isdir(args.adapter):
            raise UsageError(f"--adapter {args.adapter}: not a directory")
        if args.raw and args.system is not None:
            raise UsageError("--system needs the chat template; it cannot go with --raw")
        if args.raw and args.prompt is None:
            raise UsageError("--raw goes with --prompt")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise UsageError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
        if args.adapter is not None:
            check_adapter(args.model, args.adapter)  # (seconds, before JAX and the weights)
        import transformers

        from jqlora import compile_cache
        from jqlora.adapters import load_model
        from jqlora.models.decode import eos_token_ids

        compile_cache.enable()  # (before the first compilation)

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        except Exception as e:  # noqa: BLE001 - whatever transformers raises for a missing/broken tokenizer
            raise UsageError(f"{args.model}: cannot load a tokenizer ({type(e).__name__}: {e})".splitlines()[0])
        if not args.raw and not getattr(tokenizer, "chat_template", None):  # (before minutes of loading)
            raise UsageError(f"{args.model}: the tokenizer has no chat template (use --prompt with --raw)")
        try:
            model = load_model(args.model, quant=args.quant, dtype=args.dtype, adapter=args.adapter)
        except (ValueError, OSError) as e:  # ConvertError / AdapterError are ValueErrors
            raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__)
        eos = eos_token_ids(args.model, tokenizer)
        if args.prompt is not None and args.raw:
            ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
            if not ids:
                raise UsageError("--prompt is empty after tokenization")
            _stream_text(model, tokenizer, ids, args, eos, sys.stdout)
            return 0
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        if args.prompt is not None:
            ids = chat_ids(tokenizer, [*system, {"role": "user", "content": args.prompt}])
            _stream_text(model, tokenizer, ids, args, eos, sys.stdout)
            return 0
        messages: list[dict[str, str]] = list(system)
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = chat_ids(tokenizer, messages)
            new = _stream_text(model, tokenizer, ids, args, eos, sys.stdout)
            messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from jqlora.cli import run

    run(main)  # (sys.exit(main()), quiet when a pipe's reader has gone: `... | head`)
