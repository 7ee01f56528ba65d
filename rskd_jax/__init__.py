"""rskd_jax: offline knowledge distillation with sampled sparse teacher targets.

The package root imports nothing heavy: `rskd_jax.sampling` and `rskd_jax.losses` need only
jax, so other JAX codebases can import them without flax, optax or tensorstore installed.
"""

__version__ = "0.1.0"
