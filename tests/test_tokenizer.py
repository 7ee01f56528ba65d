"""SmolLM2 tokenizer built offline from the GGUF: parity with transformers' own GGUF tokenizer."""

from __future__ import annotations

import json
import os
import re
import sysconfig

import pytest

from rskd_jax.tokenizer import load_tokenizer, smollm2_gguf_path

STDLIB = sysconfig.get_paths()["stdlib"]
# The fingerprint is a contract: token stores record it, and a change invalidates them.
SMOLLM2_FINGERPRINT = "6ce526e7fe47c831"

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, emoji 🤖🚀 and ZWJ 👩\u200d💻.",
    "digits: 2024-11-28, 3.14159, 1e10, x1y22z333, ٣٤٥, ½ ²",
    "whitespace  runs:\t\t tabs\n\n\n   three newlines,   trailing   \n",
    "CRLF line\r\nendings\r\n and\u00a0nbsp and \u3000 ideographic space",
    "literal specials are text: <|im_end|> <|endoftext|> <filename>",
]


def stdlib_texts() -> list[str]:
    names = ["json/decoder.py", "textwrap.py", "heapq.py", "turtle.py", "pydoc_data/topics.py"]
    return [open(os.path.join(STDLIB, n), encoding="utf-8").read()[:60_000] for n in names]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def reference():
    """transformers' own tokenizer from the same GGUF (specials encoded as text, like ours)."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), split_special_tokens=True
    )


def test_ids_and_identity(tok):
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (49152, 2, 1)
    assert tok.fingerprint == SMOLLM2_FINGERPRINT
    assert tok.backend.id_to_token(tok.eos_id) == "<|im_end|>"
    for text in TEXTS + stdlib_texts():
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.eos_id not in tok.encode("<|im_end|>")  # a literal special string is plain text


@pytest.mark.slow
def test_parity_with_transformers_gguf_tokenizer(tok, reference):
    # 1. Everything but the pre-tokenizer (vocab, merges, byte alphabet, added tokens) is
    #    checked on real text: give transformers our pre-tokenizer and the ids must match.
    texts = TEXTS + stdlib_texts()
    ours = tok.encode_batch(texts)
    backend = reference.backend_tokenizer
    original = backend.pre_tokenizer
    backend.pre_tokenizer = tok.backend.pre_tokenizer
    try:
        assert [reference.encode(t, add_special_tokens=False) for t in texts] == ours
    finally:
        backend.pre_tokenizer = original
    # 2. With transformers unmodified, ids are identical on every text where no whitespace
    #    is directly followed by a digit (digits, unicode and whitespace runs included) ...
    clean = [t for t in texts if not re.search(r"\s\d", t)]
    assert len(clean) >= 4
    assert [reference.encode(t, add_special_tokens=False) for t in clean] == tok.encode_batch(clean)
    # 3. ... and differ there on purpose: the GGUF says pre="smollm", which llama.cpp and
    #    SmolLM2's tokenizer.json split digit-first; transformers falls back to plain GPT-2.
    text = "x =  1"
    assert [tok.backend.id_to_token(i) for i in tok.encode(text)] == ["x", "Ġ=", "ĠĠ", "1"]
    assert reference.convert_ids_to_tokens(reference.encode(text, add_special_tokens=False)) == [
        "x",
        "Ġ=",
        "Ġ",
        "Ġ",
        "1",
    ]


def test_built_once_and_cached(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("RSKD_CACHE_DIR", str(tmp_path))
    built = load_tokenizer(smollm2_gguf_path())
    (cached,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "tokenizer.json"]
    mtime = os.path.getmtime(cached)
    again = load_tokenizer("smollm2")
    assert os.path.getmtime(cached) == mtime
    from_json = load_tokenizer(cached)  # a tokenizer.json path (with its tokenizer_config.json)
    for other in (built, again, from_json):
        assert (other.fingerprint, other.eos_id, other.bos_id) == (tok.fingerprint, 2, 1)
        assert other.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    with open(os.path.join(os.path.dirname(cached), "tokenizer_config.json")) as f:
        config = json.load(f)
    assert (config["eos_token"], config["bos_token"]) == ("<|im_end|>", "<|im_start|>")
    assert config["gguf_pre_tokenizer"] == "smollm" and config["add_bos_token"] is False


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="expected 'smollm2', a .gguf file, a tokenizer.json"):
        load_tokenizer(str(tmp_path / "nothing"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_tokenizer(str(tmp_path / "x.gguf"))
