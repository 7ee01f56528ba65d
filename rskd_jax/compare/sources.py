"""The text sources of a comparison: '@pydoc' inputs, the docs corpus, and the merged mix.

Each source is tokenized into its own token store by the data program; `merge_token_stores`
then writes one store `tokens/mix`: train = every source's train rows, val = every source's
val rows interleaved, val_<source> = one source's val rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from rskd_jax.compare.config import CompareConfig, SourceConfig
from rskd_jax.compare.state import CompareError
from rskd_jax.config import ConfigError

PYDOC = "@pydoc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


def ensure_python_docs(docs_dir: str) -> str:
    """The python3.11-doc reST sources dir, extracted into `docs_dir` first if missing
    (`apt-get download python3.11-doc && dpkg-deb -x python3.11-doc*.deb DIR`, no install)."""
    sources = os.path.join(docs_dir, PYDOC_SOURCES)
    if os.path.isdir(sources):
        return sources
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise CompareError(
            f"the Python docs corpus is not in {docs_dir} and {' and '.join(missing)} "
            "is not available to fetch it. On a Debian/Ubuntu machine run `apt-get download "
            f"python3.11-doc && dpkg-deb -x python3.11-doc*.deb {docs_dir}`, copy the extracted "
            f"tree here, or drop the docs source with reproduce.docs=false"
        )
    print(f"fetching python3.11-doc into {docs_dir} (apt-get download, no install)", flush=True)
    with tempfile.TemporaryDirectory(prefix="pydoc-") as tmp:
        got = subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, capture_output=True, text=True)
        debs = [f for f in os.listdir(tmp) if f.startswith("python3.11-doc") and f.endswith(".deb")]
        if got.returncode or not debs:
            raise CompareError(
                f"`apt-get download python3.11-doc` failed ({got.stderr.strip()[-300:]}); try "
                "`apt-get update` first, or set reproduce.docs=false to run without the docs corpus"
            )
        os.makedirs(docs_dir, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, debs[0]), docs_dir], check=True)
    if not os.path.isdir(sources):
        raise CompareError(f"python3.11-doc was extracted to {docs_dir} but has no {PYDOC_SOURCES}")
    return sources


def uses_docs(source: SourceConfig) -> bool:
    return any(i == PYDOC or i.startswith(PYDOC + "/") for i in source.inputs)


def resolve_inputs(inputs, docs_dir: str) -> tuple[str, ...]:
    """'@pydoc' / '@pydoc/sub' -> paths under the extracted docs (fetched on first use)."""
    out = []
    for item in inputs:
        if item == PYDOC or item.startswith(PYDOC + "/"):
            item = ensure_python_docs(docs_dir) + item[len(PYDOC) :]
        out.append(item)
    return tuple(out)


def active_sources(r: CompareConfig) -> tuple[SourceConfig, ...]:
    """The sources this run reads: all of them, or (reproduce.docs=false) those without '@pydoc'."""
    kept = tuple(s for s in r.sources if r.docs or not uses_docs(s))
    if not kept:
        raise ConfigError("reproduce.docs=false drops every source; add one without '@pydoc'")
    return kept


def token_store_ok(url: str) -> bool:
    """True if a complete token store opens at `url`."""
    from rskd_jax.store.tokens import open_token_store

    try:
        open_token_store(url)
        return True
    except (ValueError, OSError):
        return False


def merge_token_stores(stores: dict[str, str], output: str) -> dict:
    """{source: token store} -> one store: train / val = the sources' rows concatenated in
    source order, val_<source> = that source's val rows. Rows are copied, never re-cut, so
    each val_<source> holds exactly the documents of that source's val split."""
    import numpy as np

    from rskd_jax.store.tokens import open_token_store, write_token_store

    opened = {n: open_token_store(u) for n, u in stores.items()}
    first = next(iter(opened.values()))
    for n, s in opened.items():
        if s.manifest["tokenizer"] != first.manifest["tokenizer"] or s.seq_len != first.seq_len:
            raise CompareError(f"source {n!r} was tokenized differently (tokenizer or seq_len)")

    def rows(s, split):
        if split not in s.splits:
            return np.zeros((0, s.seq_len), np.int32)
        return s.read(split, np.arange(s.num_rows(split)))

    vals = [rows(s, "val") for s in opened.values()]
    # val rows round-robin over the sources: the train-time eval (its first eval_batches
    # batches, in order) sees every source, not just the first one
    order = sorted((i / len(v), k, i) for k, v in enumerate(vals) for i in range(len(v)))
    splits = {
        "train": np.concatenate([rows(s, "train") for s in opened.values()]),
        "val": np.stack([vals[k][i] for _, k, i in order]) if order else vals[0],
    }
    splits.update({f"val_{n}": v for n, v in zip(opened, vals)})
    manifest = {
        "tokenizer": first.manifest["tokenizer"],
        "eos_id": first.manifest.get("eos_id"),
        "sources": [
            {"name": n, "tokens": s.url, "content_hash": s.fingerprint, "rows": {k: s.num_rows(k) for k in s.splits}}
            for n, s in opened.items()
        ],
        "mix": "train: the sources' train rows concatenated in this order; val: their val rows "
        "interleaved in proportion; val_<name>: one source's val rows",
    }
    final = write_token_store(output, splits, manifest, overwrite=True)
    return {
        "output": output,
        "content_hash": final["content_hash"],
        "rows": {k: int(v.shape[0]) for k, v in splits.items()},
        "tokens": {k: int(v.size) for k, v in splits.items()},
    }
