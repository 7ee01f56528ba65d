"""BOS per tokenizer_config.json (Gemma, Llama 2) or the tokenizer's post-processor (Llama 3)."""

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
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("config, template, bos", [
    ({"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>"}, False, True),  # Gemma
    ({"add_bos_token": False, "bos_token": "<bos>"}, True, False),   # the config has the say
    (None, True, True),                                               # Llama 3: post-processor
    (None, False, False),                                             # SmolLM2: no BOS
])
def test_bos_follows_the_tokenizer_config(tmp_path, config, template, bos):
    tok = load_tokenizer(_write(tmp_path, config, template))
    assert tok.add_bos is bos and tok.bos_id == 0
    want = [0, 5, 3] if bos else [5, 3]
    assert tok.encode_batch(["ab a", "b"]) == [want, ([0] if bos else []) + [4]]
    assert tok.encode("ab a") == want


def test_bos_is_part_of_the_fingerprint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    with_bos = load_tokenizer(_write(tmp_path / "x", {"add_bos_token": True, "bos_token": "<bos>"}))
    without = load_tokenizer(_write(tmp_path / "y", {"add_bos_token": False}))
    assert with_bos.fingerprint != without.fingerprint


def test_add_bos_without_a_bos_token_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match="add_bos_token"):
        load_tokenizer(_write(tmp_path, {"add_bos_token": True, "bos_token": "<nope>"}))
