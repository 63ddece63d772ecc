"""Shared fixtures: float64 on demand, NumPy random generators."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs the test with ``jax_enable_x64`` on (float64 arrays by default)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)
