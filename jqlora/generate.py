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
import sys
from collections.abc import Sequence





class UsageError(Exception):
    """A user's mistake: printed as one line, exit status 2."""


def _eos_from(path: str, tokenizer) -> list[int]:
    ids: list[int] = []
    try:
        import transformers

        gen = transformers.GenerationConfig.from_pretrained(path)
        e = gen.eos_token_id
        ids = [e] if isinstance(e, int) else list(e or [])
    except OSError:  # no generation_config.json: fall back to the tokenizer's
        ids = []
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


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
    args = _parser().parse_args(argv)
    import os

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
        import transformers

        from jqlora.adapters import load_model

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
        eos = _eos_from(args.model, tokenizer)
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
    sys.exit(main())
