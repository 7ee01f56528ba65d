"""The pure-functional core imports and runs with only jax: flax, optax, orbax, tensorstore
and grain are blocked in a fresh interpreter (a sys.meta_path finder that raises)."""

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
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
