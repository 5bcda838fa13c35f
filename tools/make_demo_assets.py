"""Build the demo's data and tokenizer, deterministically and offline (the base model is pretrained on
`pretrain.txt` by tools/make_demo_model.py).

    python tools/make_demo_assets.py [--out assets/demo]

writes
    pretrain.txt      the base model's "pretraining" text: every country's capital, stated in a few ways and as
                      plain-text question + answer ("What is the capital of Peru? The capital of Peru is Lima.")
    chat.jsonl        400 conversations (format chat) asking the capitals of 24 of the 32 countries in five ways,
                      some with a system prompt, some two or three turns long
    chat_eval.jsonl   40 held-out conversations: the other 8 countries (France among them), each asked in the five
                      ways. Their facts are in the pretraining text only, never in a chat, so a right answer after
                      fine-tuning shows the adapter taught the chat format, not the facts.
    grpo_prompts.jsonl  160 plain-text prompts for the GRPO demo (configs/demo-grpo.yaml): every country asked in
                      five phrasings the pretraining text never uses ("Could you name the capital of Peru?"), with
                      the columns the rewards read (answer: the answer sentence, capital). The base answers them
                      right less than half the time (it drifts to a garbled or wrong capital), the pretraining
                      phrasings almost always: GRPO has something to learn.
    model/            a byte-level BPE tokenizer (vocab 512) trained on all that text, ChatML chat template,
                      eos = <|im_end|> (ends every turn, so generation stops there), pad = <|endoftext|>
Running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Peru": "Lima", "Chile": "Santiago", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Iran": "Tehran", "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Russia": "Moscow", "Australia": "Canberra", "Argentina": "Buenos Aires",
    "Morocco": "Rabat", "Nepal": "Kathmandu", "Vietnam": "Hanoi",
}
SYSTEM = "You are a concise assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


FORMS = ("What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}.",
         "Tell me the capital city of {c}.", "{c} has which capital?")
GRPO_FORMS = ("Do you know the capital of {c}?", "Quick question: what is the capital of {c}?",
              "Capital city of {c}, please.", "Could you name the capital of {c}?",
              "Do you know which city is the capital of {c}?")  # never in pretrain.txt
HELD_OUT = ("France", "Japan", "Kenya", "Brazil", "Norway", "Turkey", "Cuba", "Australia")  # never in a chat


def answer(country: str) -> str:
    return f"The capital of {country} is {CAPITALS[country]}."


def pretrain_lines() -> list[str]:
    lines = []
    for c in sorted(CAPITALS):
        cap = CAPITALS[c]
        lines += [answer(c), f"{cap} is the capital of {c}.", f"{c}'s capital city is {cap}."]
        lines += [f"{form.format(c=c)} {answer(c)}" for form in FORMS]
    return lines


def grpo_prompts() -> list[dict]:
    return [{"prompt": form.format(c=c), "answer": answer(c), "capital": CAPITALS[c]}
            for c in sorted(CAPITALS) for form in GRPO_FORMS]


def _conversations(rng, n):
    countries = [c for c in sorted(CAPITALS) if c not in HELD_OUT]
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            c = rng.choice(countries)
            messages += [{"role": "user", "content": rng.choice(FORMS).format(c=c)},
                         {"role": "assistant", "content": answer(c)}]
        out.append({"messages": messages})
    return out


def make_data(seed: int = 0, n_train: int = 400):
    rng = random.Random(seed)
    evals = [{"messages": [{"role": "user", "content": form.format(c=c)}, {"role": "assistant", "content": answer(c)}]}
             for form in FORMS for c in HELD_OUT]
    return _conversations(rng, n_train), evals


def make_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=512)
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    # Readable by transformers 4.x too: the generic fast class (5.x writes its own new name) and the template
    # inside tokenizer_config.json (older versions do not read chat_template.jinja).
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHATML)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return fast


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
    train, evals = make_data(args.seed)
    _write_jsonl(os.path.join(args.out, "chat.jsonl"), train)
    _write_jsonl(os.path.join(args.out, "chat_eval.jsonl"), evals)
    _write_jsonl(os.path.join(args.out, "grpo_prompts.jsonl"), grpo_prompts())
    pretrain = pretrain_lines()
    with open(os.path.join(args.out, "pretrain.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(pretrain) + "\n")
    texts = pretrain + [f"{m['role']}\n{m['content']}" for conv in train for m in conv["messages"]]
    tok = make_tokenizer(texts, os.path.join(args.out, "model"))
    print(f"{args.out}: {len(train)} train / {len(evals)} eval conversations, tokenizer vocab {len(tok)}")


if __name__ == "__main__":
    main()
