"""What the benchmarks share: the record of the machine they ran on, writing their JSON, and
the rules they compare."""

from __future__ import annotations

import json
import os
import platform

import jax
import numpy as np

from clair_jax.experiments.text_copy.config import METHODS

RULES = tuple(m for m in METHODS if m != "local_only")
"""Every aggregation rule of ``clair_jax``, in table order (local-only, which aggregates
nothing, left out): the text-copy experiment's rules."""


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


def write_json(record: dict, folder: str, name: str) -> str:
    """Writes ``record`` to ``<folder>/<name>`` (folder created), says so, returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return path
