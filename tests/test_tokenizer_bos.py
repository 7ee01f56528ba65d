"""BOS per tokenizer_config.json (Gemma, Llama 2), the GGUF metadata or the tokenizer's own
post-processor (Llama 3); the llama-bpe and qwen2 GGUF pre-tokenizers."""

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from rskd_jax.tokenizer import TokenizerError, load_tokenizer

VOCAB = {"<bos>": 0, "<eos>": 1, "[UNK]": 2, "a": 3, "b": 4, "ab": 5}


def _write(tmp_path, config=None, template=False):
    backend = tokenizers.Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:  # Llama 3 style: the tokenizer.json itself adds BOS
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _adds_bos(tok):
    """What data.add_bos=auto reads: does the tokenizer's own encoding start with BOS?"""
    return tok.backend.encode("a", add_special_tokens=True).ids[:1] == [tok.bos_id]


@pytest.mark.parametrize(
    "config, template, bos",
    [
        ({"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>"}, False, True),  # Gemma
        ({"add_bos_token": False, "bos_token": "<bos>"}, True, False),  # the config has the say
        (None, True, True),  # Llama 3: post-processor
        (None, False, False),  # SmolLM2: no BOS
    ],
)
def test_bos_follows_the_tokenizer_config(tmp_path, config, template, bos):
    tok = load_tokenizer(_write(tmp_path, config, template))
    assert tok.bos_id == 0 and _adds_bos(tok) is bos
    assert tok.encode_batch(["ab a", "b"]) == [[5, 3], [4]]  # never special tokens here
    assert tok.encode("ab a") == [5, 3]


def test_bos_leaves_the_fingerprint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    with_bos = load_tokenizer(_write(tmp_path / "x", {"add_bos_token": True, "bos_token": "<bos>"}))
    without = load_tokenizer(_write(tmp_path / "y", {"add_bos_token": False}))
    assert with_bos.fingerprint == without.fingerprint  # the ids of a text are the same


def test_add_bos_without_a_bos_token_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match="add_bos_token"):
        load_tokenizer(_write(tmp_path, {"add_bos_token": True, "bos_token": "<nope>"}))


TEXT = "x =  1234567 + y's\n\n\tdef f(a, b):  # héllo wörld 42\r\n    return a+b  "


def _write_gguf(path, pre):
    """A byte-level BPE GGUF (all 256 byte tokens, a few merges, BOS) with pre-tokenizer `pre`."""
    gguf = pytest.importorskip("gguf")
    from rskd_jax.tokenizer import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ =", "d e", "de f"]
    tokens = alphabet + ["Ġ=", "de", "def", "<|begin_of_text|>", "<|end_of_text|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_split_pre_tokenizers(tmp_path, monkeypatch, pre):
    """Llama 3's and Qwen2's GGUF tags split text as their tokenizer.json regex does."""
    regex = pytest.importorskip("regex")
    from rskd_jax.tokenizer import _SPLIT_PRE, _bytes_to_unicode

    monkeypatch.setenv("RSKD_CACHE_DIR", str(tmp_path / "cache"))
    _write_gguf(tmp_path / "t.gguf", pre)
    tok = load_tokenizer(str(tmp_path / "t.gguf"))
    unspell = {c: b for b, c in _bytes_to_unicode().items()}
    pieces = [bytes(unspell[c] for c in p).decode("utf-8") for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(TEXT)]
    assert pieces == regex.findall(_SPLIT_PRE[pre], TEXT)
    assert ("1234567" in pieces) is False and ("123" in pieces) is (pre == "llama-bpe")
    assert _adds_bos(tok)  # the GGUF's add_bos_token
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("def") == [258]  # the merges apply ("def" is token 256 + 2)
