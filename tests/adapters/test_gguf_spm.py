"""SentencePiece BPE tokenizers (Llama 2 / Phi-3 / Gemma style) in a GGUF: transformers' GGUF loader rebuilds the
tokenizer from the file's tokens, scores and types (its merges re-derived from our scores by transformers' own
``generate_merges``) and gives the Hugging Face tokenizer's ids on texts with byte fallback, runs of spaces, digits
and special tokens; the space prefix follows the normalizer / pre-tokenizer; what llama.cpp's SentencePiece
tokenizer cannot reproduce is refused in one line.

The tokenizers are made here the way transformers converts a SentencePiece model: a vocabulary with scores (pieces
trained by the tokenizers library on a small text, specials and the 256 byte tokens first), merges from it by
transformers' ``generate_merges``, and transformers' own LlamaTokenizer / GemmaTokenizer around them.
"""

import json

import gguf
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer
from transformers.tokenization_utils_base import generate_merges

from jqlora.adapters.errors import ExportError
from jqlora.adapters.gguf_vocab import add_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "numbers 12 345 and 6789", "a tokenizer splits text into pieces", "the theory of the thing"] * 20
TEXT = "the quick hello  world, 12 345 café ☃ pieces\nof the thing"
SPECIAL_TEXT = "<s>the dog</s>hello <s> world"
N_VOCAB = 512
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _pieces():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, show_progress=False))
    return [p for p, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def _spm_tokenizer(style, dst):
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if style == "gemma" else ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p in _pieces() if p not in specials]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: -float(i) for i, t in enumerate(tokens)}  # (a SentencePiece BPE model's scores: by rank)
    merges = generate_merges(vocab, scores)
    tok = (GemmaTokenizer if style == "gemma" else LlamaTokenizer)(vocab=vocab, merges=merges)
    tok.save_pretrained(dst)
    if style == "legacy":  # Llama 2 / Phi-3's own tokenizer.json (the prefix by a normalizer), loaded as it is
        tj = json.loads((dst / "tokenizer.json").read_text())
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        tj["pre_tokenizer"] = None
        (dst / "tokenizer.json").write_text(json.dumps(tj))
        config = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return AutoTokenizer.from_pretrained(dst)


def _vocab_gguf(src, dst, arch):
    dst.mkdir()
    w = gguf.GGUFWriter(dst / "vocab.gguf", arch)
    w.add_block_count(1)
    add_tokenizer(w, src, N_VOCAB, CHAT)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return gguf.GGUFReader(dst / "vocab.gguf")


# (transformers' GGUF loader rebuilds a llama-architecture SentencePiece tokenizer with prepend_scheme 'first', a
# phi3 one with the Prepend normalizer that llama.cpp's tokenizer matches: llama's special text is left to llama.cpp
# itself, in tools/llamacpp_check.py)
@pytest.mark.parametrize("style, arch, prefix", [("legacy", "llama", True), ("legacy", "phi3", True),
                                                 ("gemma", "gemma2", False)])
def test_sentencepiece_vocab_round_trips(tmp_path, style, arch, prefix):
    ref = _spm_tokenizer(style, tmp_path / "tok")
    reader = _vocab_gguf(tmp_path / "tok", tmp_path / "g", arch)
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert bool(reader.fields["tokenizer.ggml.add_space_prefix"].parts[-1][0]) is prefix
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [field.parts[i][0] for i in field.data]
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in reader.fields["tokenizer.ggml.tokens"].data]
    bos = "<bos>" if style == "gemma" else "<s>"
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE and types[tokens.index(bos)] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED and tokens[-1] == f"[PAD{N_VOCAB - 1}]"
    got = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="vocab.gguf")
    texts = [TEXT] if arch == "llama" else [TEXT, " " + TEXT, SPECIAL_TEXT if arch == "phi3" else
                                            SPECIAL_TEXT.replace("<s>", "<bos>").replace("</s>", "<eos>")]
    for text in texts:
        want = ref(text)["input_ids"]
        assert "☃" not in text or any(tokens[i].startswith("<0x") for i in want)  # byte fallback is exercised
        assert got(text)["input_ids"] == want, text
    assert got.chat_template == CHAT


def test_sentencepiece_refusals_are_one_line(tmp_path):
    _spm_tokenizer("llama", tmp_path / "first")  # (transformers 5's LlamaTokenizer: Metaspace 'first')
    with pytest.raises(ExportError, match="transformers tokenizes with Metaspace prepend_scheme 'first'"):
        _vocab_gguf(tmp_path / "first", tmp_path / "g1", "llama")
    _spm_tokenizer("legacy", tmp_path / "tok")
    tj = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    merges = tj["model"]["merges"]
    tj["model"]["merges"] = merges[:3] + merges[5:]  # tokens the pair of pieces spells, with no merge
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="no merge makes token"):
        _vocab_gguf(tmp_path / "tok", tmp_path / "g2", "llama")
    made = ["".join(m) for m in merges]
    twice = next(i for i in range(1, len(made)) if made[i] == made[i - 1])  # a token two merges make
    tj["model"]["merges"] = merges[:twice] + merges[twice + 1:] + [merges[twice]]  # ranked apart
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match=f"the merges that make {made[twice]!r} are not adjacent in rank"):
        _vocab_gguf(tmp_path / "tok", tmp_path / "g3", "llama")
