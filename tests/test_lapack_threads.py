"""``import clair_jax`` sets jaxlib's CPU LAPACK library to one thread (and only that one).

Each check runs in a fresh interpreter whose environment has no BLAS thread
variables (the root conftest sets ``OPENBLAS_NUM_THREADS=1`` for the suite).
jaxlib's library is found independently of clair_jax: the BLAS libraries loaded
after a jitted SVD that a process importing NumPy alone did not load.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import clair_jax as cj

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "CLAIR_JAX_LAPACK_THREADS",
)

SCRIPT = """
import json, sys
import numpy
from threadpoolctl import threadpool_info

numpy_pools = {{i["filepath"]: i["num_threads"] for i in threadpool_info()}}
{before}
import jax, jax.numpy as jnp
import clair_jax
jax.block_until_ready(jax.jit(jnp.linalg.svd)(jnp.eye(6, 4)))
pools = threadpool_info()
print(json.dumps({{
    "lapack": [i["num_threads"] for i in pools if i["filepath"] not in numpy_pools],
    "numpy": [(i["num_threads"], numpy_pools[i["filepath"]])
              for i in pools if i["filepath"] in numpy_pools],
    "reported": [i["num_threads"] for i in clair_jax.lapack_threadpool_info()],
}}))
"""

LATE = """
import scipy.linalg
jax_first = __import__("jax")
jax_first.block_until_ready(jax_first.jit(jax_first.numpy.linalg.qr)(jax_first.numpy.eye(5)))
"""


def pools(before: str = "", **env_vars: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(env_vars)
    script = textwrap.dedent(SCRIPT.format(before=before))
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if not result["lapack"]:
        pytest.skip("jaxlib's LAPACK is NumPy's BLAS library here: nothing separate to check")
    return result


@pytest.mark.parametrize("before", ["", LATE], ids=["imported-first", "imported-after-jax-use"])
def test_import_sets_one_lapack_thread(before):
    result = pools(before)
    assert result["lapack"] == [1] * len(result["lapack"])
    assert result["reported"] == result["lapack"]
    # NumPy's own BLAS keeps the pool it had.
    assert all(now == then for now, then in result["numpy"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 2 threads from 1")
def test_user_choice_is_kept():
    assert set(pools(OPENBLAS_NUM_THREADS="2")["lapack"]) == {2}
    assert set(pools(CLAIR_JAX_LAPACK_THREADS="2")["lapack"]) == {2}
    assert 1 not in pools(CLAIR_JAX_LAPACK_THREADS="keep")["lapack"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_limit_lapack_threads_rejects(bad):
    with pytest.raises(ValueError, match="num_threads"):
        cj.limit_lapack_threads(bad)
