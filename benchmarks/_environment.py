"""What a benchmark's JSON records about the machine it ran on."""

from __future__ import annotations

import os
import platform

import jax
import numpy as np


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere).

    Figures from different machines differ (the NumPy baseline of ``solver_scaling.py``
    took 356 ms on one 2-core machine and 293 ms on another), so each record names it.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(**versions: str) -> dict:
    """JAX version and backend, devices, CPU model and count, platform, versions, ``XLA_FLAGS``.

    Args:
      **versions: further package versions to record (``tensorly="0.9.0"``).
    """
    return {
        "jax": jax.__version__,
        "numpy": np.__version__,
        **versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
