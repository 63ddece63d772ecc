"""Sparsity structures and classic Robust PCA (``cj.rpca``).

References: NumPy group soft-thresholding, cvxpy (CLARABEL / SCS) optima on tiny
problems, exact recovery of Candès et al.'s model, and tensorly's
``robust_pca`` on the same problem.
"""

import chex
import cvxpy as cp
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import clair_jax as cj
from clair_jax._src.linalg import sparsity


def numpy_group_prox(z, tau, kind):
    """Reference group soft-threshold, one group at a time."""
    out = np.zeros_like(z)
    n, p, q = z.shape
    for i in range(n):
        if kind == "block":
            groups = [(slice(None), slice(None))]
        elif kind == "column":
            groups = [(slice(None), j) for j in range(q)]
        else:
            groups = [(a, b) for a in range(p) for b in range(q)]
        for g in groups:
            block = z[i][g]
            norm = np.linalg.norm(block)
            if norm > tau[i]:
                out[i][g] = (1 - tau[i] / norm) * block
    return out


def low_rank_plus_sparse(rng, m, n_cols, rank, fraction, magnitude=50.0):
    low = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n_cols))
    mask = rng.random((m, n_cols)) < fraction
    sparse = np.where(mask, rng.uniform(-magnitude, magnitude, (m, n_cols)), 0.0)
    return low, sparse


@pytest.mark.parametrize("kind", ["block", "column", "entry"])
def test_prox_matches_numpy(kind, x64, rng):
    z = rng.standard_normal((4, 5, 3))
    tau = np.array([0.5, 1.0, 3.0, 0.0])
    got = sparsity.prox(jnp.asarray(z), jnp.asarray(tau), kind)
    np.testing.assert_allclose(got, numpy_group_prox(z, tau, kind), atol=1e-12)


@pytest.mark.parametrize("kind", ["block", "column", "entry"])
def test_norm_matches_numpy(kind, x64, rng):
    z = rng.standard_normal((3, 4, 2))
    w = np.array([1.0, 0.5, 2.0])
    if kind == "block":
        per_client = np.linalg.norm(z, axis=(1, 2))
    elif kind == "column":
        per_client = np.linalg.norm(z, axis=1).sum(axis=1)
    else:
        per_client = np.abs(z).sum(axis=(1, 2))
    got = sparsity.norm(jnp.asarray(z), jnp.asarray(w), kind)
    np.testing.assert_allclose(got, w @ per_client, rtol=1e-12)


@pytest.mark.parametrize("kind", ["column", "entry"])
@pytest.mark.parametrize("method", ["fista", "admm"])
def test_penalised_structures_match_cvxpy(kind, method, x64, rng):
    n, p, q = 4, 6, 3
    x = rng.standard_normal((n, p, q))
    lam_nuc, lam_s = 1.0, 0.4
    m = np.transpose(x, (1, 0, 2)).reshape(p, n * q)
    low, sp = cp.Variable((p, n * q)), cp.Variable((p, n * q))
    if kind == "entry":
        penalty = cp.sum(cp.abs(sp))
    else:
        penalty = cp.sum(cp.norm(sp, 2, axis=0))
    fit = 0.5 * cp.sum_squares(m - low - sp)
    prob = cp.Problem(cp.Minimize(fit + lam_nuc * cp.normNuc(low) + lam_s * penalty))
    prob.solve(solver="CLARABEL")
    sol = cj.decompose(
        x, lam_nuc=lam_nuc, lam_block=lam_s, method=method, sparsity=kind, tol=1e-10, max_iter=20000
    )
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.objective), prob.value, rtol=1e-6)
    # The interior-point solution is accurate to ~1e-4 where L + S is ill-conditioned.
    np.testing.assert_allclose(cj.blocks_to_matrix(sol.low_rank), low.value, atol=1e-3)


def test_rpca_exact_recovery(x64, rng):
    low, sparse = low_rank_plus_sparse(rng, 60, 80, rank=3, fraction=0.08)
    res = cj.rpca(low + sparse, tol=1e-9, max_iter=3000)
    assert bool(res.converged)
    assert int(res.rank) == 3
    assert np.linalg.norm(res.low_rank - low) / np.linalg.norm(low) < 1e-5
    assert np.linalg.norm(res.sparse - sparse) / np.linalg.norm(sparse) < 1e-5
    np.testing.assert_allclose(float(res.lam), 1 / np.sqrt(80))


@pytest.mark.slow
def test_rpca_column_outlier_pursuit(x64, rng):
    """Whole corrupted columns are found with ``sparsity="column"``."""
    low = rng.standard_normal((30, 2)) @ rng.standard_normal((2, 60))
    bad = np.arange(0, 60, 10)
    data = low.copy()
    data[:, bad] = 3.0 * rng.standard_normal((30, bad.size))
    res = cj.rpca(data, lam=0.5, sparsity="column", tol=1e-9, max_iter=5000)
    assert bool(res.converged)
    flagged = np.flatnonzero(np.linalg.norm(res.sparse, axis=0) > 1e-6)
    np.testing.assert_array_equal(flagged, bad)
    good = np.setdiff1d(np.arange(60), bad)
    np.testing.assert_allclose(res.low_rank[:, good], low[:, good], atol=1e-6)


def test_rpca_matches_cvxpy(x64, rng):
    low, sparse = low_rank_plus_sparse(rng, 8, 10, rank=1, fraction=0.2, magnitude=3.0)
    data = low + sparse + 0.1 * rng.standard_normal((8, 10))  # not exactly recoverable
    lam = 1 / np.sqrt(10)
    lv, sv = cp.Variable((8, 10)), cp.Variable((8, 10))
    prob = cp.Problem(cp.Minimize(cp.normNuc(lv) + lam * cp.sum(cp.abs(sv))), [lv + sv == data])
    prob.solve(solver="CLARABEL")
    res = cj.rpca(data, tol=1e-10, max_iter=20000)
    assert bool(res.converged)
    np.testing.assert_allclose(float(res.objective), prob.value, rtol=1e-6)
    np.testing.assert_allclose(res.low_rank, lv.value, atol=1e-4)


@pytest.mark.slow
def test_rpca_agrees_with_tensorly(x64, rng):
    tl_decomposition = pytest.importorskip("tensorly.decomposition")
    low, sparse = low_rank_plus_sparse(rng, 40, 50, rank=2, fraction=0.05)
    data = low + sparse
    lam = 1 / np.sqrt(50)
    # tensorly's objective sums the nuclear norms of both unfoldings of a matrix,
    # i.e. 2 reg_J ||D||_*; reg_J = 1/2 makes it exactly ||D||_* + lam ||E||_1.
    d, e = tl_decomposition.robust_pca(
        data, reg_E=lam, reg_J=0.5, tol=1e-9, n_iter_max=5000, verbose=0
    )
    res = cj.rpca(data, lam=lam, tol=1e-10, max_iter=5000)
    np.testing.assert_allclose(res.low_rank, d, atol=1e-5 * np.abs(low).max())
    np.testing.assert_allclose(res.sparse, e, atol=1e-5 * np.abs(low).max())


class TestJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        with jax.enable_x64(True):
            low, sparse = low_rank_plus_sparse(np.random.default_rng(0), 20, 24, 2, 0.05)
            data = jnp.asarray(low + sparse)
            fn = self.variant(lambda m: cj.rpca(m, tol=1e-8).low_rank)
            np.testing.assert_allclose(fn(data), low, atol=1e-5)


class TestTransforms:
    @pytest.mark.slow
    def test_vmap_matches_loop(self, x64, rng):
        mats = np.stack([sum(low_rank_plus_sparse(rng, 12, 16, 1, 0.05)) for _ in range(3)])
        batched = jax.vmap(lambda m: cj.rpca(m, tol=1e-9).low_rank)(jnp.asarray(mats))
        for k in range(3):
            np.testing.assert_allclose(
                batched[k], cj.rpca(mats[k], tol=1e-9).low_rank, rtol=1e-6, atol=1e-8
            )

    @pytest.mark.slow
    def test_grad_matches_finite_differences(self, x64, rng):
        low, sparse = low_rank_plus_sparse(rng, 6, 7, 1, 0.1, magnitude=3.0)
        data = jnp.asarray(low + sparse + 0.05 * rng.standard_normal((6, 7)))
        probe = jnp.asarray(rng.standard_normal((6, 7)))

        def f(m, lam):
            return jnp.sum(probe * cj.rpca(m, lam=lam, tol=1e-12, max_iter=20000).low_rank)

        jax.test_util.check_grads(f, (data, 0.4), order=1, modes=["rev"], eps=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"matrix": np.ones((2, 3, 4))}, r"matrix must have shape \(m, N\), got shape \(2, 3, 4\)"),
        ({"matrix": np.ones((0, 3))}, "non-empty"),
        ({"matrix": np.array([[1.0, np.nan]])}, "matrix"),
        ({"matrix": np.ones((3, 3)), "lam": -1.0}, "lam"),
        ({"matrix": np.ones((3, 3)), "lam": np.ones(2)}, "lam"),
        ({"matrix": np.ones((3, 3)), "sparsity": "block"}, "sparsity"),
        ({"matrix": np.ones((3, 3)), "method": "fista"}, "method"),
    ],
)
def test_rpca_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cj.rpca(**kwargs)


def test_decompose_rejects_unknown_sparsity():
    with pytest.raises(ValueError, match="sparsity must be one of"):
        cj.decompose(np.ones((2, 3, 3)), lam_nuc=1.0, lam_block=1.0, sparsity="rows")
