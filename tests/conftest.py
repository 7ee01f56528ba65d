"""Test-wide set-up: 8 fake CPU devices so sharding paths run on one machine.

XLA reads the flag when jax initialises its backend, so it is set before any test imports
jax. Single-device code is unaffected (it runs on device 0).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
