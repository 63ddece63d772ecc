"""What a benchmark's JSON records about the machine it ran on."""

from __future__ import annotations

import os
import platform

import jax


def environment() -> dict:
    """JAX version and backend, devices, CPU count, Python version and ``XLA_FLAGS``."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
