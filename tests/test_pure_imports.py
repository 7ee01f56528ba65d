"""The pure-functional core imports and runs with only jax, and the store readers with only
numpy + tensorstore: the other dependencies are blocked in a fresh interpreter (a
sys.meta_path finder that raises)."""

import os
import subprocess
import sys
import textwrap

BLOCKED = ("flax", "optax", "orbax", "tensorstore", "grain")

SCRIPT = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import flax  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    import jax
    import jax.numpy as jnp

    from rskd_jax import losses, sampling

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2, 0.0]]))
    st = sampling.sample_tokens(jax.random.key(0), logits, 4)
    loss = losses.sparse_kd_loss(logits, st.ids, st.weights)
    assert loss.shape == (1,) and bool(jnp.isfinite(loss).all())
    assert sampling.top_k_targets(logits, 2).ids.shape == (1, 2)
    h, w = jnp.ones((1, 3, 2)), jnp.ones((2, 4))
    ids, wt = jnp.zeros((1, 3, 1), jnp.int32), jnp.ones((1, 3, 1))
    assert losses.sparse_kd_loss_from_hidden(h, w, ids, wt, chunk_size=2).shape == (1, 3)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not heavy, heavy
    print("ok")
    """
)


def test_sampling_and_losses_import_without_heavy_dependencies():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device is enough; keeps start-up short
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


READER_BLOCKED = ("flax", "optax", "orbax", "grain", "jax", "jaxlib")

READER_SCRIPT = textwrap.dedent(
    f"""
    import sys

    import numpy as np

    BLOCKED = {READER_BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Blocker())
    for mod in ("jax", "flax", "grain"):
        try:
            __import__(mod)
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")

    from rskd_jax.store import forms, open_teacher_store, open_token_store, token_hash

    tokens_url, teacher_url = sys.argv[1], sys.argv[2]
    tokens = open_token_store(tokens_url).read("train", np.array([1, 0]))
    store = open_teacher_store(teacher_url)
    rows = store.read_rows("train", np.array([1, 0]))
    assert (token_hash(tokens) == rows["token_hash"]).all()
    trimmed = store.read_rows_as("train", np.array([1, 0]), "trimmed", bucket=1)
    ragged = forms.ragged(rows, bucket=1)
    assert trimmed["ids"].shape[-1] == rows["num_ids"].max()
    assert ragged["entry_ids"].shape == (rows["num_ids"].sum(),)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not heavy, heavy
    print("ok")
    """
)


def test_store_reader_needs_only_numpy_and_tensorstore(tmp_path):
    import numpy as np

    from rskd_jax.store.teacher import create_teacher_store
    from rskd_jax.store.tokens import write_token_store

    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50, (8, 16)).astype(np.int32)
    manifest = write_token_store(
        str(tmp_path / "tokens"), {"train": toks}, {"tokenizer": {"fingerprint": "t", "vocab_size": 50}}
    )
    store = create_teacher_store(
        str(tmp_path / "teacher"),
        manifest={"tokens": {"fingerprint": manifest["content_hash"]}},
        num_rows={"train": 8},
        seq_len=16,
        method="sample",
        k=4,
        vocab_size=50,
        chunk_rows=8,
        diagnostics=False,
        token_hash=True,
    )
    ids = np.tile(np.arange(4), (8, 16, 1))
    counts = np.zeros((8, 16, 4), np.int64)
    counts[..., 0] = 1
    counts[..., 1] = 3
    counts[:, ::3] = 1  # some positions hold 4 entries, most 2
    store.write_rows("train", 0, {"ids": ids, "counts": counts, "tokens": toks}).result()
    store.close()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", READER_SCRIPT, str(tmp_path / "tokens"), str(tmp_path / "teacher")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
