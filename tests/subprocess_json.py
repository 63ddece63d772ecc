"""Runs a test script in a fresh CPU-only interpreter and reads the JSON it prints.

JAX fixes its device count when its backend starts, so the multi-device tests run
their scripts in subprocesses. A timeout turns a hang (e.g. the jaxlib 0.10
batched-LAPACK deadlock on CPU) into a failure instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_json(
    script: str, *args: str, xla_devices: int | None = None, env=None, timeout: float = 300
) -> dict:
    """Runs ``script`` with ``args``; returns the JSON object on its last line of stdout.

    ``XLA_FLAGS`` keeps the caller's flags but its device count, replaced by
    ``--xla_force_host_platform_device_count=xla_devices`` when given; ``env``
    adds variables. The test fails with the script's stderr when it exits non-zero.
    """
    full = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu"}
    flags = [f for f in full.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if xla_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={xla_devices}")
    full["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
