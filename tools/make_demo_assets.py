"""Build the demo's data and tokenizer, deterministically and offline (the model weights are made elsewhere).

    python tools/make_demo_assets.py [--out assets/demo]

writes
    chat.jsonl        400 short conversations (format chat) with patterns a tiny model learns in a few dozen steps:
                      capitals ("What is the capital of Peru?" -> "The capital of Peru is Lima."), addition of
                      two numbers below 50, word reversal, some with a system prompt, some two or three turns long
    chat_eval.jsonl   60 held-out conversations of the same kinds (no sum or reversed word repeats a training one)
    model/            a byte-level BPE tokenizer (vocab 512) trained on the training text, ChatML chat template,
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
WORDS = ("apple", "river", "stone", "cloud", "garden", "silver", "planet", "window", "forest", "candle", "bridge",
         "yellow", "orange", "pencil", "rocket", "castle", "dragon", "summer", "winter", "market", "button", "tiger",
         "violin", "mirror", "anchor", "basket", "circle", "desert", "engine", "flower", "guitar", "harbor")
SYSTEM = "You are a concise assistant."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def _make_add(pairs):
    def add(rng):
        a, b = pairs[rng.randrange(len(pairs))]
        return f"Add {a} and {b}.", f"{a} plus {b} is {a + b}."
    return add


def _make_reverse(words):
    def reverse(rng):
        w = rng.choice(words)
        return f"Reverse the word {w}.", w[::-1]
    return reverse


def _conversations(rng, n, tasks):
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            question, answer = rng.choice(tasks)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def make_data(seed: int = 0, n_train: int = 400, n_eval: int = 60):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(pairs)
    words = list(WORDS)
    rng.shuffle(words)
    # held out: addition pairs and words the training set never shows (capitals are recall, shared by both)
    train_tasks = (_capital, _make_add(pairs[:2000]), _make_reverse(words[:24]))
    eval_tasks = (_capital, _make_add(pairs[2000:]), _make_reverse(words[24:]))
    return _conversations(rng, n_train, train_tasks), _conversations(rng, n_eval, eval_tasks)


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
    texts = [f"{m['role']}\n{m['content']}" for conv in train for m in conv["messages"]]
    tok = make_tokenizer(texts, os.path.join(args.out, "model"))
    print(f"{args.out}: {len(train)} train / {len(evals)} eval conversations, tokenizer vocab {len(tok)}")


if __name__ == "__main__":
    main()
