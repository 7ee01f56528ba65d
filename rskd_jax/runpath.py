"""Run directories as local paths or URLs, through one path layer: `etils.epath` (orbax's own).

`train.output`, the evaluated checkpoint and the comparison's `reproduce.output` /
`reproduce.results_dir` may be a local path, a `file://` URL (the local path behind it), or an
object-store URL epath knows (`gs://`, `s3://`; their backends, e.g. gcsfs / s3fs or
TensorFlow's gfile, must be installed). Every file of a run goes through `run_path`: orbax
checkpoints (orbax takes the epath.Path), config.yaml, metrics.jsonl, TensorBoard events, the
exported hf/ directory, the comparison's state and results.

Object stores cannot append to or rename an object, so `is_local` tells the writers which way
to go: a local run directory is written in place (append, flush, atomic rename); a remote one
is staged in a local temporary directory and uploaded whole (`upload_tree`) at checkpoints and
at the end (train.MetricsLog). Writes of whole small files (`write_text`) are atomic on both:
local files by a rename, objects by the store.

    >>> import tempfile
    >>> d = run_path("file://" + tempfile.mkdtemp())
    >>> write_text(d / "x" / "a.txt", "hi"); read_text(d / "x" / "a.txt"), read_text(d / "none")
    ('hi', None)
"""

from __future__ import annotations

import os
import shutil

from etils import epath


def run_path(url: str | os.PathLike) -> epath.Path:
    """An epath.Path for a local path, a file:// URL (epath has no file:// backend: the local
    path behind it) or an object-store URL (gs://, s3://)."""
    url = os.fspath(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        url = os.path.abspath(url)
    return epath.Path(url)


def is_local(path: str | os.PathLike) -> bool:
    """True for a local path or file:// URL (append and rename work), False for an object store."""
    return "://" not in os.fspath(run_path(path))


def read_text(path: str | os.PathLike) -> str | None:
    """The file's text, or None when it does not exist."""
    p = run_path(path)
    return p.read_text(encoding="utf-8") if p.exists() else None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces the file with `text` at once (parents created): a reader never sees half of it."""
    p = run_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_local(p):
        tmp = p.parent / (p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(os.fspath(tmp), os.fspath(p))
    else:  # an object is replaced whole by one write
        p.write_text(text, encoding="utf-8")


def upload_tree(local_dir: str, dest: str | os.PathLike, *, replace: bool = False) -> None:
    """Copies every file under `local_dir` to the same relative path under `dest` (overwriting);
    with `replace`, `dest` is removed first. Local destinations: a copy tree."""
    out = run_path(dest)
    if replace and out.exists():
        out.rmtree()
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = out if rel == "." else out / rel
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            if is_local(target):
                shutil.copyfile(os.path.join(root, name), os.fspath(target / name))
            else:
                (target / name).write_bytes(open(os.path.join(root, name), "rb").read())


def download_tree(src: str | os.PathLike, local_dir: str) -> str:
    """Copies every file under `src` (a path or URL) into `local_dir`; returns local_dir."""
    root = run_path(src)
    for p in root.rglob("*"):
        if p.is_file():
            target = os.path.join(local_dir, os.fspath(p.relative_to(root)))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(p.read_bytes())
    return local_dir
