"""lm-eval-harness's model interface on jqlora's own model (registered as ``"jqlora"``), in JAX with no PyTorch model.

`JqloraLM` is an `lm_eval.api.model.TemplateLM`: lm-eval tokenizes requests (``TemplateLM.loglikelihood`` splits
context and continuation as it does for every causal model); jqlora scores and decodes them, batched
(`jqlora.evaluation.batching`). What each request means follows lm-eval's ``hf`` backend (HFLM) so that the numbers
agree with it on the same weights:

- ``loglikelihood``: ``(context + continuation)[-(max_length + 1):]``, its last ``len(continuation)`` tokens scored;
  an empty context is the prefix token (BOS, else EOS).
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens after the prefix token, each
  scored as a loglikelihood request, summed per document.
- ``generate_until``: the context left-truncated to ``max_length - max_gen_toks`` tokens, greedy unless
  ``do_sample``; a row ends at an EOS id of the model's generation config (else the tokenizer's) or once its text holds
  a stop string (``until``, plus the tokenizer's EOS text); the text is cut before the first stop string.

Requests are sorted longest first (lm-eval's `Collator`) so a batch holds rows of similar length.
"""

from __future__ import annotations

import os
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jqlora.evaluation.batching import Scorer, generate_rows
from jqlora.models.decode import eos_token_ids

DEFAULT_MAX_GEN_TOKS = 256


@register_model("jqlora")
class JqloraLM(TemplateLM):
    """lm-eval's LM on a jqlora model: either ``pretrained`` (a Hugging Face or jqlora model directory, with
    ``adapter``, a peft LoRA directory, loaded by `jqlora.load_model` with ``quant`` and ``dtype``) or a loaded
    ``model`` with its ``tokenizer`` (a transformers tokenizer or the directory holding one)."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, *, model: Any = None,
                 tokenizer: Any = None, quant: str = "nf4", dtype: str = "bfloat16", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, seed: int = 0,
                 generation_config: str | None = None, **_: Any):  # (lm-eval also passes device, max_batch_size)
        super().__init__()
        import transformers

        if (model is None) == (pretrained is None):
            raise ValueError("JqloraLM needs either pretrained=DIR (with adapter=DIR) or model= with tokenizer=")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported by jqlora: give a number")
        if model is None:
            from jqlora.adapters import load_model

            model = load_model(pretrained, quant=quant, dtype=dtype, adapter=adapter, remat="none")
            if tokenizer is None:
                has_own = adapter is not None and os.path.isfile(os.path.join(adapter, "tokenizer.json"))
                tokenizer = adapter if has_own else pretrained
        if tokenizer is None:
            raise ValueError("JqloraLM(model=...) needs tokenizer= (a tokenizer or its directory)")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else int(model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = int(seed)
        self.eos_ids = eos_token_ids(generation_config or pretrained, tokenizer)
        self.scorer = Scorer(model, self.batch_size)

    def set_model(self, model) -> None:
        """Evaluate ``model`` (the same structure, other values: a trainer's adapters) without compiling again."""
        self.model = model
        self.scorer.update(model)

    # -- what lm-eval asks of a model ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As HFLM: the tokenizer's own special tokens unless told (``add_bos_token``), none when the text already
        starts with the prefix token's text."""
        kw: dict[str, Any] = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        def key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=key)
        batch = list(order.get_batched(n=0))[0] if requests else []  # (n=0: everything, sorted)
        rows = []
        for _, context, continuation in batch:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation")
            ids = (context + continuation)[-(self.max_length + 1):]
            rows.append((ids, min(len(continuation), len(ids) - 1)))
        with tqdm(total=len(rows), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            res = self.scorer.score(rows, on_batch=bar.update)
        for (string, _, _), answer in zip(batch, res):
            if string is not None:  # (rolling windows have no cache key: cached per document)
                self.cache_hook.add_partial("loglikelihood", string, answer)
        return order.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        res: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in order.get_batched(n=0):  # (one group of equal gen_kwargs; generate_rows batches it)
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be below the model's max_length {self.max_length}")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
            knobs = dict(temperature=float(kwargs.get("temperature") or 0.0), top_p=float(kwargs.get("top_p") or 1.0),
                         top_k=int(kwargs.get("top_k") or 0)) if sample else {}
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for c in contexts]

            def finished(tokens: list[int]) -> bool:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                return any(s and s in text for s in until)

            new = generate_rows(self.model, prompts, batch_size=self.batch_size, max_new_tokens=max_gen,
                                eos_ids=self.eos_ids, finished=finished, seed=self.seed, **knobs)
            for context, gen_kwargs, tokens in zip(contexts, all_kwargs, new):
                text = postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until,
                                                  None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(res)
