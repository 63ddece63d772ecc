"""Shared fixtures: float64 on demand, NumPy random generators, scripts in a subprocess."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


# Tests compile thousands of small XLA:CPU programs and run each a few times, so
# most of their time goes to compiling. XLA's HLO passes run as for users, so the optimised
# programs are the same; only their lowering to machine code is made cheaper:
# LLVM at -O0 and, on jaxlib 0.10 (whose CPU backend still has them), the classic
# fusion emitters. Flags already in XLA_FLAGS win.
def _cheap_codegen_flags() -> str:
    from importlib.metadata import version

    flags = os.environ.get("XLA_FLAGS", "").split()
    extra = {"--xla_backend_optimization_level": "0"}
    if tuple(int(part) for part in version("jaxlib").split(".")[:2]) < (0, 11):
        extra["--xla_cpu_use_fusion_emitters"] = "false"
    for name, value in extra.items():
        if not any(flag.startswith(name + "=") for flag in flags):
            flags.append(f"{name}={value}")
    return " ".join(flags)


os.environ["XLA_FLAGS"] = _cheap_codegen_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after every test module.

    The whole suite compiles thousands of XLA:CPU programs in one process; with
    all of them kept alive, XLA crashed (segmentation fault while compiling) about
    80% of the way through the suite, at a different test as tests were added.
    """
    yield
    jax.clear_caches()


@pytest.fixture
def x64():
    """Runs the test with ``jax_enable_x64`` on (float64 arrays by default)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


@pytest.fixture
def run_python():
    """Runs a Python script (dedented) in a fresh interpreter at the repository root.

    For programs that may hang (the jaxlib 0.10 batched-LAPACK deadlock on CPU, see
    ``clair_jax/_src/linalg/batching.py``): past ``timeout`` seconds the test fails with
    ``subprocess.TimeoutExpired`` instead of stalling the suite.
    """
    root = Path(__file__).resolve().parents[1]

    def run(script: str, timeout: float) -> None:
        command = [sys.executable, "-c", textwrap.dedent(script)]
        subprocess.run(command, cwd=root, check=True, timeout=timeout)

    return run
