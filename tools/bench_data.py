"""Data-program benchmark on real text: throughput per worker count, peak memory vs corpus
size, work saved by resuming after SIGKILL, and shuffled batch reads.

    python tools/bench_data.py --json [--files 600] [--scale 16] [--workers 1 2] [--seq-len 512]

The corpus is the first `--files` CPython standard-library sources (sorted paths, test dirs
excluded) written as one JSONL.zst shard per 100 documents in a temporary directory. Each
measurement runs the real program (`python -m rskd_jax.data`) as a subprocess:

- `tokens_per_s[w]`: tokens / wall seconds of a fresh run over the scaled corpus with
  `data.workers=w` (`tokens_per_s_in_program`: the program's own figure, without interpreter
  start-up and imports), and the speed-up of the largest w over w=1; `cpu_s[w]` is the CPU time of the program and its
  workers (from `wait4` rusage), so a loaded machine shows up as cpu_s << w x wall;
- `peak_rss_mb`: the largest summed RSS of the program and its workers (sampled every
  20 ms from /proc; `peak_rss_main_mb` the program alone) on the corpus and on `--scale` x the
  corpus (every document repeated with a "# copy k" marker line, so all are distinct), with 2 workers;
- `resume`: a run killed with SIGKILL once half its shards are tokenized, then re-run:
  the shards the re-run tokenized vs a fresh run's, wall seconds of both, and whether the
  two stores hold identical bytes;
- `read`: shuffled global batches through `train_data.make_batch_iterator` (rows/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(out_dir: str, n_files: int, copies: int, per_file: int = 100) -> int:
    """JSONL.zst shards of stdlib sources, `copies` times (copy k > 0 gets a marker line)."""
    import zstandard

    from rskd_jax.corpus import expand_inputs

    files = expand_inputs(["@stdlib"])[0][:n_files]
    texts = []
    for f in files:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    os.makedirs(out_dir, exist_ok=True)
    docs = [t if k == 0 else f"# copy {k}\n{t}" for k in range(copies) for t in texts]
    for i in range(0, len(docs), per_file):
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs[i : i + per_file])
        with open(os.path.join(out_dir, f"part-{i // per_file:05d}.jsonl.zst"), "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(body.encode()))
    return len(docs)


def _tree_rss(pid: int) -> tuple[int, int]:
    """(summed RSS of `pid` and its descendants, RSS of `pid` alone) in bytes, from /proc."""
    total, main, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            total += rss
            main = rss if p == pid else main
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total, main


def run_program(args: list[str], *, kill_when=None) -> dict:
    """Runs `python -m rskd_jax.data ARGS`; wall s, CPU s, peak tree RSS, summary (or killed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    start, cpu0 = time.perf_counter(), children_cpu()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rskd_jax.data", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    peak, peak_main, killed = 0, 0, False
    while proc.poll() is None:
        total, main = _tree_rss(proc.pid)
        peak, peak_main = max(peak, total), max(peak_main, main)
        if kill_when is not None and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    out = proc.communicate()[0].decode()
    wall = time.perf_counter() - start
    # RUSAGE_CHILDREN covers the program and the workers it waited for
    res = {
        "wall_s": round(wall, 2),
        "cpu_s": round(children_cpu() - cpu0, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_main_mb": round(peak_main / 2**20, 1),
        "killed": killed,
        "returncode": proc.returncode,
    }
    if not killed:
        if res["returncode"] != 0:
            raise SystemExit(f"the data program failed: {args}")
        res["summary"] = json.loads(out.strip().splitlines()[-1])
    return res


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--files", type=int, default=600, help="stdlib sources in the 1x corpus")
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokenizer", default="smollm2", help="data.tokenizer for every run")
    parser.add_argument("--batch", type=int, default=64, help="global batch for the read benchmark")
    parser.add_argument("--read-steps", type=int, default=100)
    parser.add_argument(
        "--speed-on-1x",
        dest="speed_scaled",
        action="store_false",
        help="measure tokens/s on the 1x corpus (default: the scaled one; start-up "
        "costs of a few seconds dominate a small corpus)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "rss", "resume", "read"])
    a = parser.parse_args()
    say = (lambda *m: None) if a.json else (lambda *m: print(*m, file=sys.stderr, flush=True))

    from rskd_jax.tokenizer import load_tokenizer

    load_tokenizer(a.tokenizer)  # built and cached outside the timed runs
    result: dict = {
        "cpus": os.cpu_count(),
        "files": a.files,
        "seq_len": a.seq_len,
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        one, big = os.path.join(tmp, "x1"), os.path.join(tmp, f"x{a.scale}")
        result["documents_1x"] = write_corpus(one, a.files, 1)
        result["documents_scaled"] = write_corpus(big, a.files, a.scale)
        base = [
            f"data.tokenizer={a.tokenizer}",
            f"data.seq_len={a.seq_len}",
            "data.shard_records=25",
            "data.val_fraction=0.05",
        ]
        if "speed" not in a.skip:
            result["tokens_per_s"], result["cpu_s"], result["wall_s"] = {}, {}, {}
            for w in a.workers:
                r = run_program(
                    [
                        f"data.inputs={big if a.speed_scaled else one}",
                        f"data.output={tmp}/speed{w}",
                        f"data.workers={w}",
                        *base,
                    ]
                )
                result["tokens"] = r["summary"]["tokens"]
                result["tokens_per_s"][w] = round(r["summary"]["tokens"] / r["wall_s"])
                result.setdefault("tokens_per_s_in_program", {})[w] = r["summary"]["tokens_per_s"]
                result.setdefault("program_cpu_s", {})[w] = r["summary"]["cpu_s"]
                result["wall_s"][w] = r["wall_s"]
                result["cpu_s"][w] = r["cpu_s"]
                say(
                    f"workers={w}: {result['tokens_per_s'][w]} tokens/s, {r['wall_s']} s wall, "
                    f"{result['cpu_s'][w]} CPU s"
                )
            lo, hi = min(a.workers), max(a.workers)
            result["speedup"] = round(result["tokens_per_s"][hi] / result["tokens_per_s"][lo], 3)
            hashes = {run_hash(f"{tmp}/speed{w}") for w in a.workers}
            result["stores_identical_across_workers"] = len(hashes) == 1
        if "rss" not in a.skip:
            result["peak_rss_mb"], result["peak_rss_main_mb"] = {}, {}
            for name, corpus in (("1x", one), (f"{a.scale}x", big)):
                r = run_program([f"data.inputs={corpus}", f"data.output={tmp}/rss{name}", "data.workers=2", *base])
                result["peak_rss_mb"][name] = r["peak_rss_mb"]
                result["peak_rss_main_mb"][name] = r["peak_rss_main_mb"]
                result[f"tokens_{name}"] = r["summary"]["tokens"]
                say(f"{name}: {r['summary']['tokens']} tokens, peak RSS {r['peak_rss_mb']} MB, {r['wall_s']} s")
            result["peak_rss_growth_mb"] = round(result["peak_rss_mb"][f"{a.scale}x"] - result["peak_rss_mb"]["1x"], 1)
        if "resume" not in a.skip:
            result["resume"] = resume_figures(tmp, one, base)
            say(f"resume: {result['resume']}")
        if "read" not in a.skip:
            result["read"] = read_figures(
                f"{tmp}/speed{max(a.workers)}" if "speed" not in a.skip else None, a.batch, a.read_steps, a.seq_len
            )
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, sort_keys=True))


def run_hash(url: str) -> str:
    from rskd_jax.store.tokens import open_token_store

    s = open_token_store(url)
    return s.manifest["content_hash"] + s.manifest["doc_starts_hash"]


def resume_figures(tmp: str, corpus: str, base: list[str]) -> dict:
    """SIGKILL once half the shards are spooled or consumed, then re-run; vs a fresh run."""
    fresh = run_program([f"data.inputs={corpus}", f"data.output={tmp}/fresh", "data.workers=2", *base])
    total = fresh["summary"]["shards"]
    out = f"{tmp}/killed"

    def half_done() -> bool:
        try:
            with open(f"{out}/_work/state.json") as f:
                state = json.load(f)
            consumed = state["mixer"]["shard"][0]
        except (OSError, ValueError, KeyError):
            consumed = 0
        try:
            spooled = len(os.listdir(f"{out}/_work/shards"))
        except OSError:
            spooled = 0
        return consumed + spooled >= total // 2 and consumed > 0

    args = [f"data.inputs={corpus}", f"data.output={out}", "data.workers=2", "data.checkpoint_seconds=1", *base]
    killed = run_program(args, kill_when=half_done)
    again = run_program(args)
    s = again["summary"]
    return {
        "shards": total,
        "fresh_shards_tokenized": fresh["summary"]["shards_tokenized"],
        "fresh_wall_s": fresh["wall_s"],
        "killed_after_s": killed["wall_s"],
        "killed": killed["killed"],
        "rerun_shards_tokenized": s["shards_tokenized"],
        "rerun_wall_s": again["wall_s"],
        "rerun_resumed": s["resumed"],
        "identical": run_hash(out) == run_hash(f"{tmp}/fresh"),
    }


def read_figures(url: str | None, batch: int, steps: int, seq_len: int) -> dict:
    if url is None:
        return {}
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import Rows, make_batch_iterator

    it = make_batch_iterator(Rows(open_token_store(url), "train"), global_batch_size=batch, seed=0)
    next(it)  # thread pool start-up
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    s = time.perf_counter() - start
    return {"batch": batch, "rows_per_s": round(steps * batch / s), "tokens_per_s": round(steps * batch * seq_len / s)}


if __name__ == "__main__":
    main()
