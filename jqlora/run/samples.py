"""What the trainer shows of its model's replies: the greedy reply to ``train.sample_prompt`` before and after
training, and to the first ``train.eval_samples`` eval prompts at each evaluation (single-process only)."""

from __future__ import annotations

import jax
import numpy as np


def readable(text: str) -> str:
    """A reply fit to print: no control characters, no U+FFFD of bytes that are not UTF-8 (a random model's)."""
    shown = "".join(c if c.isprintable() else " " for c in text.replace("\ufffd", ""))
    return " ".join(shown.split()) or "(no text)"


class Samples:
    """Greedy replies of a trainer's model (a mixin of `jqlora.run.loop.Trainer`: it uses ``split``, ``lora``,
    ``tokenizer``, ``tc`` and ``eval_ds``)."""

    def _reply(self, ids, max_new_tokens: int = 32) -> str:
        from jqlora.models.decode import generate

        out = generate(self.split.model(self.lora), np.asarray(ids, np.int32), max_new_tokens=max_new_tokens,
                       eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()

    def sample(self, max_new_tokens: int = 32) -> str | None:
        """The model's greedy reply to ``train.sample_prompt`` (None without a prompt or a chat template)."""
        prompt = self.tc.sample_prompt
        if not prompt or not getattr(self.tokenizer, "chat_template", None) or jax.process_count() > 1:
            return None  # (generation is single-process)
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        return self._reply(ids, max_new_tokens)

    def eval_samples(self) -> list[dict]:
        """Greedy replies to the first ``train.eval_samples`` eval prompts (each example up to its first trained
        token: the conversation so far, rendered as in training)."""
        n = self.tc.eval_samples
        if not n or self.eval_ds is None or jax.process_count() > 1:
            return []
        out = []
        for ex in self.eval_ds.examples[:n]:
            first = int(np.argmax(np.asarray(ex.trained)[1:] > 0)) + 1
            ids = list(ex.ids[:first])
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")
            out.append({"prompt": prompt, "reply": self._reply(ids)})
        return out

    def print_sample(self, when: str) -> None:
        reply = self.sample()
        if reply is not None:
            shown = readable(reply)
            print(f"[{when}] {self.tc.sample_prompt}\n    -> {shown}", flush=True)
