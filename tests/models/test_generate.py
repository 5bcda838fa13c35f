"""jqlora.generate against transformers' `generate` (greedy tokens and per-step logits, float32), peft adapters,
its own full-sequence forward (KV cache = recomputation), transformers' top-k / top-p warpers, and invariants
(one compilation per shape bucket, seeded sampling, EOS, left padding, the CLI)."""

import functools
import io
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from jqlora import generate as gen
from jqlora import load_model
from jqlora.lora import LoraConfig, LoraLinear
from jqlora.adapters import save_adapter
from jqlora.models import decode
from test_model import forward, load, make_hf, token_ids

N_NEW = 32
# (id, model_type, config overrides): every attention variant the cached step has to get right
CASES = [
    ("llama-gqa-llama3rope-tied", "llama", dict(tie_word_embeddings=True, max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    ("qwen2-bias-sliding-some-layers", "qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    ("qwen3-qknorm", "qwen3", dict(head_dim=32)),
    ("mistral-sliding", "mistral", dict(sliding_window=6, head_dim=16)),  # window ≪ prompt + 32 new tokens
    ("llama-dynamic-ntk", "llama", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),  # generation runs past the trained length
]


def hf_greedy(hf, ids: np.ndarray, n: int = N_NEW, attention_mask: np.ndarray | None = None):
    """transformers' greedy tokens ``[B, n]`` and per-step logits ``[B, n, V]``, never stopping early."""
    kw = {} if attention_mask is None else {"attention_mask": torch.from_numpy(attention_mask).long()}
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids).long(), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=0, repetition_penalty=1.0, return_dict_in_generate=True,
                          output_logits=True, **kw)
    return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).numpy()


def stream_with_logits(model, prompt, **kw):
    steps = list(decode.generate_stream(model, prompt, return_logits=True, **kw))
    return np.stack([t for t, _ in steps], 1), np.stack([lg for _, lg in steps], 1)


def set_random_lora_b(model, seed: int, scale: float = 0.3):
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear) and m.lora_b is not None:
            m.lora_b.set_value(jnp.asarray(rng.normal(0, scale, m.lora_b.shape).astype(np.float32)))


@functools.cache
def family(name: str):
    """(name, transformers model, checkpoint dir, jqlora float32 model) for one of `CASES`, built once."""
    _, model_type, overrides = next(c for c in CASES if c[0] == name)
    hf, path = make_hf(model_type, overrides, seed=1)
    return name, hf, path, load(path)


ALL = [c[0] for c in CASES]
GQA, MISTRAL, DYNAMIC = "llama-gqa-llama3rope-tied", "mistral-sliding", "llama-dynamic-ntk"


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name", ALL)
def test_greedy_matches_transformers(name):
    _, hf, _, model = family(name)
    ids = token_ids(1, 11, seed=5)
    ref_tokens, ref_logits = hf_greedy(hf, ids)
    tokens, logits = stream_with_logits(model, ids, max_new_tokens=N_NEW)
    assert tokens.shape == (1, N_NEW)
    assert len(set(ref_tokens[0].tolist())) > 1  # not a constant
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(decode.generate(model, ids[0], max_new_tokens=N_NEW), ref_tokens[0])


@pytest.mark.parametrize("name", [GQA, MISTRAL, DYNAMIC])  # padding does not depend on biases or q/k norm
def test_left_padded_batch_matches_transformers(name):
    _, hf, _, model = family(name)
    prompts = [token_ids(1, 11, seed=5)[0], token_ids(1, 6, seed=6)[0]]
    got = decode.generate(model, prompts, max_new_tokens=20)
    if name != "llama-dynamic-ntk":  # dynamic NTK scales by the batch's longest row (as transformers does)
        for prompt, row in zip(prompts, got):  # each row as if it had been generated alone
            np.testing.assert_array_equal(row, decode.generate(model, prompt, max_new_tokens=20))
    ids = np.zeros((2, 11), np.int32)
    mask = np.zeros((2, 11), np.int32)
    for b, p in enumerate(prompts):
        ids[b, 11 - len(p):], mask[b, 11 - len(p):] = p, 1
    ref, _ = hf_greedy(hf, ids, 20, attention_mask=mask)
    np.testing.assert_array_equal(got, ref)


def test_adapter_generation_matches_peft(tmp_path):
    hf, path = make_hf("qwen2", {}, seed=2)
    lcfg = LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    trained = load(path, lora=lcfg)
    set_random_lora_b(trained, seed=3)
    save_adapter(trained, tmp_path / "adapter", base_model_name_or_path=path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = token_ids(1, 9, seed=7)
    ref_tokens, ref_logits = hf_greedy(pm, ids)
    model = load_model(path, adapter=tmp_path / "adapter", quant="none", dtype="float32")
    tokens, logits = stream_with_logits(model, ids, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    with pm.disable_adapter():
        base_tokens, _ = hf_greedy(pm, ids)
    assert not np.array_equal(base_tokens, ref_tokens)  # the adapter matters


# ----------------------------------------------------------------------------------------------------------------
# The cache against recomputation, and compilation


# not dynamic NTK: its cached keys keep the frequencies they were rotated with, by design (as in transformers)
@pytest.mark.parametrize("name", [n for n in ALL if n != DYNAMIC])
def test_kv_cache_equals_full_recompute(name):
    _, _, _, model = family(name)
    ids = token_ids(1, 8, seed=9)
    tokens, logits = stream_with_logits(model, ids, max_new_tokens=32)
    seq = np.concatenate([ids, tokens], axis=1)
    full = np.asarray(forward(model, jnp.asarray(seq)))
    # logits after step i come from the sequence up to prompt + i tokens
    np.testing.assert_allclose(logits[0], full[0, 7:7 + 32], atol=1e-4, rtol=0)


def test_quantized_lora_model_cache_equals_recompute(tmp_path):
    _, path = make_hf("mistral", dict(sliding_window=6, head_dim=16), seed=4)
    model = load(path, quant="nf4", lora=LoraConfig(r=4, alpha=8))
    set_random_lora_b(model, seed=5)
    ids = token_ids(1, 10, seed=3)
    tokens, logits = stream_with_logits(model, ids, max_new_tokens=12)
    full = np.asarray(forward(model, jnp.asarray(np.concatenate([ids, tokens], axis=1))))
    np.testing.assert_allclose(logits[0], full[0, 9:9 + 12], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [MISTRAL, DYNAMIC])
def test_no_recompilation_per_token(name):
    _, _, _, model = family(name)
    decode.generate(model, token_ids(1, 7)[0], max_new_tokens=2)  # warm: compiles prefill and step for this bucket
    before = decode.compile_counts()
    out = decode.generate(model, token_ids(1, 7, seed=1)[0], max_new_tokens=14)  # same bucket, many more steps
    decode.generate(model, token_ids(1, 12, seed=2)[0], max_new_tokens=3)  # another prompt length, same bucket
    assert out.shape == (14,)
    assert decode.compile_counts() == before


def test_bucketed_shapes_give_the_unbucketed_tokens(monkeypatch):
    """Prompt and cache lengths rounded up to buckets (left padding, empty slots) change no token and no logit: the
    same greedy run with exact shapes (``bucket`` the identity) is the oracle, on lengths inside and at bucket edges,
    alone and as a left-padded batch."""
    _, _, _, model = family(MISTRAL)  # (a sliding window narrower than the prompts)
    prompts = [token_ids(1, n, seed=n)[0] for n in (3, 16, 30)]  # padded to 16 / exact / padded to 32
    bucketed = [stream_with_logits(model, p, max_new_tokens=9) for p in prompts]
    batch = decode.generate(model, prompts, max_new_tokens=9)
    monkeypatch.setattr(decode, "bucket", lambda n: n)
    for p, (tokens, logits) in zip(prompts, bucketed):
        exact_tokens, exact_logits = stream_with_logits(model, p, max_new_tokens=9)
        np.testing.assert_array_equal(tokens, exact_tokens)
        np.testing.assert_allclose(logits, exact_logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(batch, decode.generate(model, prompts, max_new_tokens=9))


def test_two_prompt_lengths_in_one_bucket_compile_once():
    _, _, _, model = family(MISTRAL)
    before = decode.compile_counts()
    # prompts of 33 and 50 tokens share the 64 bucket, and with 70 and 100 new tokens the 256-slot cache (unused elsewhere)
    decode.generate(model, token_ids(1, 33, seed=3)[0], max_new_tokens=70)
    once = decode.compile_counts()
    assert once == {"prefill": before["prefill"] + 1, "step": before["step"] + 1}
    decode.generate(model, token_ids(1, 50, seed=4)[0], max_new_tokens=100)
    assert decode.compile_counts() == once


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def _hf_allowed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.from_numpy(logits.astype(np.float32))
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.isfinite(scores).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 10, 0.8), (0.5, 1, 1.0)])
def test_allowed_tokens_match_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, (4, 128)).astype(np.float32)
    got = np.asarray(decode.allowed_tokens(jnp.asarray(logits / temperature), jnp.float32(top_p), jnp.int32(top_k)))
    np.testing.assert_array_equal(got, _hf_allowed(logits, temperature, top_k, top_p))


def test_sampling_is_seeded_and_respects_top_k_top_p():
    _, _, _, model = family(GQA)
    prompts = [token_ids(1, 9, seed=1)[0], token_ids(1, 5, seed=2)[0]]
    for temperature, top_k, top_p in [(1.5, 6, 1.0), (2.0, 0, 0.7), (1.0, 20, 0.9)]:
        kw = dict(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p)
        a, logits = stream_with_logits(model, prompts, seed=11, **kw)
        b, _ = stream_with_logits(model, prompts, seed=11, **kw)
        c, _ = stream_with_logits(model, prompts, seed=12, **kw)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        allowed = _hf_allowed(logits.reshape(-1, logits.shape[-1]), temperature, top_k, top_p)
        assert allowed[np.arange(a.size), a.reshape(-1)].all()
        assert (allowed.sum(-1) > 1).any()  # a real choice was made somewhere
    greedy = decode.generate(model, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(decode.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_k=1), greedy)


def test_eos_stops_generation():
    _, _, _, model = family(GQA)
    prompt = token_ids(1, 11, seed=5)[0]
    full = decode.generate(model, prompt, max_new_tokens=N_NEW)
    i = next(i for i in range(3, N_NEW) if full[i] not in full[:i])
    out = decode.generate(model, prompt, max_new_tokens=N_NEW, eos_token_id=[999, int(full[i])])
    np.testing.assert_array_equal(out, full[:i + 1])  # stops right after emitting EOS
    # in a batch, a finished row is padded while the other goes on
    other, eos = token_ids(1, 7, seed=8)[0], int(full[i])
    alone = decode.generate(model, other, max_new_tokens=i + 4, eos_token_id=eos, pad_token_id=0)
    both = decode.generate(model, [prompt, other], max_new_tokens=i + 4, eos_token_id=eos, pad_token_id=0)
    assert both.shape == (2, max(i + 1, len(alone)))
    np.testing.assert_array_equal(both[1], np.pad(alone, (0, both.shape[1] - len(alone))))
    np.testing.assert_array_equal(both[0, :i + 1], full[:i + 1])
    assert (both[0, i + 1:] == 0).all()


def test_bad_arguments_raise():
    _, _, _, model = family(GQA)
    with pytest.raises(ValueError, match="token ids"):
        decode.generate(model, [5, 500])
    with pytest.raises(ValueError, match="top_p"):
        decode.generate(model, [5, 6], top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        decode.generate(model, [[1, 2], []])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _char_tokenizer(path):
    """A character-level tokenizer over the tiny vocabulary, with a chat template, saved to ``path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + 125)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(path)


def run_cli(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "jqlora.generate", *map(str, args)], check=False, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_cli_prompt_chat_and_errors(tmp_path, capsys, monkeypatch):
    _, path = make_hf("llama", {}, seed=0)
    _char_tokenizer(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for extra, ids in (
        (["--raw"], tok("hello")["input_ids"]),  # the text as it is
        ([], tok(tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]),
        (["--system", "be brief"], tok(tok.apply_chat_template(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], tokenize=False,
            add_generation_prompt=True), add_special_tokens=False)["input_ids"]),
    ):
        code = gen.main(["--model", str(path), "--prompt", "hello", "--max-new-tokens", "6", "--quant", "none",
                         "--dtype", "float32", *extra])
        out = capsys.readouterr()
        assert code == 0, out.err
        expected = decode.generate(load(path), ids, max_new_tokens=6, eos_token_id=tok.eos_token_id)
        expected = [t for t in expected.tolist() if t != tok.eos_token_id]
        assert out.out == tok.decode(expected, skip_special_tokens=True) + "\n", extra

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nthere\n"))
    code = gen.main(["--model", str(path), "--chat", "--max-new-tokens", "4", "--quant", "none"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(out.out.splitlines()) == 2  # one reply per user turn

    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    assert gen.main(["--model", str(path), "--adapter", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad-adapter" in err

    missing = run_cli("--model", tmp_path / "nope", "--prompt", "x")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope" in missing.stderr
