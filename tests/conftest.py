"""Shared fixtures: float64 on demand, NumPy random generators, scripts in a subprocess."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

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
