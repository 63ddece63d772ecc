"""cj.decompose against independent references (cvxpy, NumPy), exact recovery, transforms."""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.test_util import check_grads

import clair_jax as cj
from clair_jax._src.linalg import svt
from clair_jax._src.solvers import decomposition as decompose_module
from clair_jax._src.solvers import problem as problem_module

from . import reference

PEN = reference.RECOMMENDED_LAMBDAS["penalised"]
CON = reference.RECOMMENDED_LAMBDAS["constrained"]


def small_problem(seed=0, noise=0.1, **kw):
    kw = {"n": 6, "p": 8, "q": 3, "rank": 2, "n_outliers": 2, **kw}
    return reference.make_problem(seed, noise=noise, **kw)


def principal_angle_error(basis, estimate_blocks, rank):
    """``||U U^T - Û Û^T||_F`` with ``Û`` the top-``rank`` left singular vectors."""
    u = np.linalg.svd(np.asarray(cj.blocks_to_matrix(estimate_blocks)))[0][:, :rank]
    return np.linalg.norm(basis @ basis.T - u @ u.T)


# --- agreement with cvxpy (CLARABEL) and with the NumPy reference -----------------------


@pytest.mark.parametrize("method", ["fista", "admm"])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_penalised_matches_cvxpy(x64, method, offset, weighted):
    prob = small_problem(seed=1)
    x = prob["updates"] + (np.linspace(-1, 1, 24).reshape(8, 3) if offset else 0.0)
    w = np.random.default_rng(2).uniform(0.5, 1.5, size=6) if weighted else None
    ref = reference.cvxpy_decompose(x, weights=w, offset=offset, **PEN)
    sol = cj.decompose(x, weights=w, offset=offset, method=method, tol=1e-10, max_iter=20000, **PEN)
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.objective), ref["objective"], rtol=1e-5)
    np.testing.assert_allclose(sol.low_rank, ref["low_rank"], atol=1e-4)
    np.testing.assert_allclose(sol.sparse, ref["sparse"], atol=1e-4)
    if offset:
        np.testing.assert_allclose(sol.offset, ref["offset"], atol=1e-4)
    else:
        assert sol.offset is None
    # Our objective is the library's; recompute it with the reference's formula too.
    ours = reference.objective(
        x,
        np.asarray(sol.low_rank),
        np.asarray(sol.sparse),
        None if sol.offset is None else np.asarray(sol.offset),
        weights=w,
        **PEN,
    )
    np.testing.assert_allclose(ours, float(sol.objective), rtol=1e-12)


def test_admm_offset_does_not_stop_where_w_and_c_drift_apart(x64):
    # W = S + N and the offset c are updated one after the other; here they drift by
    # opposite amounts every sweep, so Δ(W + c) = 0 while the iterate still moves
    # (a rank-0 solution). ADMM used to stop "converged" after 3 iterations with an
    # objective 7.4x the optimum (penalised) and 18% above it (constrained).
    x = np.array([[[-1.1, 0.8], [-0.8, -1.1]], [[-0.3, -0.4], [-1.9, 0.5]]])
    kw = dict(lam_nuc=100.0, lam_block=0.02, weights=np.array([1.5, 0.1]), offset=True)
    ref = reference.cvxpy_decompose(x, **kw)
    sol = cj.decompose(x, method="admm", tol=1e-10, max_iter=20000, **kw)
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.objective), ref["objective"], rtol=1e-6)
    np.testing.assert_allclose(sol.offset, ref["offset"], atol=1e-5)

    x = np.array(
        [[[1.9, 1.3], [-0.1, -1.5]], [[1.4, 1.5], [-1.1, 0.7]], [[-0.8, -0.8], [-1.6, 0.9]]]
    )
    kw = dict(lam_nuc=1.0, lam_block=0.04, sparsity="entry", offset=True, constrained=True)
    ref = reference.cvxpy_decompose(x, **kw)
    sol = cj.decompose(x, tol=1e-10, max_iter=20000, **kw)
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.objective), ref["objective"], rtol=1e-6)


@pytest.mark.parametrize("offset", [False, True])
def test_constrained_matches_cvxpy(x64, offset):
    prob = small_problem(seed=3, noise=0.0)
    x = prob["updates"] + (np.linspace(-1, 1, 24).reshape(8, 3) if offset else 0.0)
    ref = reference.cvxpy_decompose(x, offset=offset, constrained=True, solver="SCS", **CON)
    sol = cj.decompose(
        x, method="admm", constrained=True, offset=offset, tol=1e-10, max_iter=20000, **CON
    )
    assert bool(sol.converged)
    np.testing.assert_allclose(float(sol.objective), ref["objective"], rtol=1e-5)
    np.testing.assert_allclose(sol.low_rank, ref["low_rank"], atol=1e-4)
    offset_value = np.asarray(sol.offset) if offset else 0.0
    feasibility = x - np.asarray(sol.low_rank) - np.asarray(sol.sparse) - offset_value
    assert np.abs(feasibility).max() < 1e-8


@pytest.mark.parametrize("method", ["fista", "admm"])
def test_penalised_matches_numpy_reference(x64, method):
    prob = reference.make_problem(5, n=14, p=16, q=4, rank=3, n_outliers=4, noise=0.05)
    w = np.random.default_rng(0).uniform(0.5, 1.5, size=14)
    lams = {"lam_nuc": 0.6, "lam_block": 0.9}
    ref = reference.numpy_decompose(prob["updates"], weights=w, offset=True, **lams)
    sol = cj.decompose(
        prob["updates"], weights=w, offset=True, method=method, tol=1e-11, max_iter=20000, **lams
    )
    np.testing.assert_allclose(sol.low_rank, ref["low_rank"], atol=1e-7)
    np.testing.assert_allclose(sol.sparse, ref["sparse"], atol=1e-7)
    np.testing.assert_allclose(sol.offset, ref["offset"], atol=1e-7)


def _textbook_admm_sweeps(x, lam_nuc, lam_block, w, mus, offset, constrained):
    """The ADMM sweep of admm.py's docstring in NumPy, with S, N and Y kept separately
    (Lin, Chen & Ma 2010): S = BST(V), N = mu/(1+mu) (V - S), Y += mu (X - c - L - S - N)."""
    low, sparse, c = np.zeros_like(x), np.zeros_like(x), np.zeros(x.shape[1:])
    noise = np.zeros_like(x) if constrained else x - c - low - sparse
    dual = noise.copy()
    for mu in mus:
        low = reference.svt(x - c - sparse - noise + dual / mu, lam_nuc / mu)
        v = x - c - low + dual / mu
        if constrained:
            sparse = reference.block_shrink(v, lam_block * w / mu)
        else:
            sparse = reference.block_shrink(v, lam_block * w * (1 + mu) / mu)
            noise = mu / (1 + mu) * (v - sparse)
        if offset:
            c = np.mean(x - low - sparse - noise + dual / mu, axis=0)
        dual = dual + mu * (x - c - low - sparse - noise)
    return low, sparse, noise, c, dual


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("constrained", [False, True])
def test_admm_sweep_carrying_s_plus_n_equals_the_textbook_sweep(x64, offset, constrained):
    # admm.sweep carries W = S + N and derives S = BST_{lam_S w}(W) (N = W - S) and the
    # multiplier from V: five sweeps with a changing penalty reproduce the sweep that
    # keeps S, N and Y apart.
    from clair_jax._src.solvers import admm

    x = small_problem(seed=3)["updates"]
    w = np.linspace(0.5, 1.5, x.shape[0])
    lam_nuc, lam_block = 0.7, 0.9
    mus = [0.3, 0.3, 0.6, 1.2, 0.6]
    options = problem_module.Options(
        constrained=constrained, offset=offset, tol=1e-9, max_iter=10,
        backend="full", rank_cap=None, power_iters=1,
    )  # fmt: skip
    data = problem_module.Data(
        jnp.asarray(x), jnp.asarray(lam_nuc), jnp.asarray(lam_block), jnp.asarray(w)
    )
    zeros = jnp.zeros_like(data.updates)
    misfit, c = zeros if constrained else data.updates, zeros[0]
    dual = zeros if constrained else data.updates
    for mu in mus:
        low, misfit, c, dual, _, _ = admm.sweep(
            data, options, misfit, c, dual, jnp.asarray(mu), None
        )
    want_l, want_s, want_n, want_c, want_y = _textbook_admm_sweeps(
        x, lam_nuc, lam_block, w, mus, offset, constrained
    )
    sparse = admm.sparse_part(data, options, misfit)
    assert float(np.linalg.norm(want_s)) > 0.1 and float(np.linalg.norm(want_l)) > 0.1
    for got, want in (
        (low, want_l),
        (sparse, want_s),
        (misfit - sparse, want_n),
        (c, want_c),
        (dual, want_y),
    ):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_solver_and_adjoint_objects_are_what_the_strings_name(x64):
    # method= and diff= take the solver and adjoint objects as well as their names:
    # same iterates, same results, one compilation for equal objects.
    from clair_jax._src.solvers.adjoint import ImplicitAdjoint, UnrolledAdjoint
    from clair_jax._src.solvers.admm import ADMM
    from clair_jax._src.solvers.fista import FISTA

    x = small_problem(seed=3)["updates"]
    kw = {"lam_nuc": 0.7, "lam_block": 0.9, "offset": True, "max_iter": 400}
    for name, solver in (("admm", ADMM()), ("fista", FISTA())):
        for diff, adjoint in (("implicit", ImplicitAdjoint()), ("unrolled", UnrolledAdjoint())):
            by_name = cj.decompose(x, method=name, diff=diff, **kw)
            before = decompose_module.solve_decomposition._cache_size()
            by_object = cj.decompose(x, method=solver, diff=adjoint, **kw)
            assert decompose_module.solve_decomposition._cache_size() == before
            for a, b in zip(by_name, by_object, strict=True):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="constrained=True"):
        cj.decompose(x, method=FISTA(), constrained=True, **kw)


# --- exact recovery (noiseless, constrained) ---------------------------------------------


@pytest.mark.parametrize("offset", [False, True])
def test_exact_recovery_noiseless(x64, offset):
    """A third of the clients arbitrary: subspace and contaminated set recovered exactly."""
    prob = reference.make_problem(0, n=30, p=40, q=3, rank=2, n_outliers=10)
    x = prob["updates"] + (np.random.default_rng(1).normal(size=(40, 3)) if offset else 0.0)
    sol = cj.decompose(
        x,
        lam_nuc=1.0,
        lam_block=0.7,
        method="admm",
        constrained=True,
        offset=offset,
        tol=1e-9,
        max_iter=5000,
    )
    assert bool(sol.converged)
    assert int(sol.rank) == 2
    flagged = np.linalg.norm(np.asarray(sol.sparse), axis=(1, 2)) > 1e-6
    np.testing.assert_array_equal(flagged, prob["outliers"])
    assert principal_angle_error(prob["basis"], sol.low_rank, 2) < 1e-7
    # Benign clients' blocks are exactly low rank (offset aside): L_i = X_i - c.
    benign = ~prob["outliers"]
    recovered = np.asarray(sol.low_rank)[benign] + (np.asarray(sol.offset) if offset else 0.0)
    np.testing.assert_allclose(recovered, x[benign], atol=1e-7)


# --- methods and backends agree ------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol,atol", [(np.float32, 1e-5, 2e-3), (np.float64, 1e-10, 1e-7)])
def test_fista_and_admm_agree(x64, dtype, tol, atol):
    prob = reference.make_problem(7, n=12, p=20, q=4, rank=2, n_outliers=4, noise=0.05)
    x = prob["updates"].astype(dtype)
    sols = [
        cj.decompose(x, method=m, offset=True, tol=tol, max_iter=10000, **PEN)
        for m in ("fista", "admm")
    ]
    for sol in sols:
        assert sol.low_rank.dtype == dtype and bool(sol.converged)
    np.testing.assert_allclose(sols[0].low_rank, sols[1].low_rank, atol=atol)
    np.testing.assert_allclose(sols[0].sparse, sols[1].sparse, atol=atol)


@pytest.mark.parametrize("method", ["fista", pytest.param("admm", marks=pytest.mark.slow)])
def test_svd_backends_agree(x64, method):
    prob = reference.make_problem(8, n=16, p=24, q=4, rank=2, n_outliers=5, noise=0.02)
    kw = {"lam_nuc": 1.5, "lam_block": 0.8, "method": method, "tol": 1e-10, "max_iter": 10000}
    full = cj.decompose(prob["updates"], svd="full", **kw)
    assert 1 < int(full.rank) < 8
    for other in (
        cj.decompose(prob["updates"], svd="gram", **kw),
        cj.decompose(prob["updates"], svd="rank_capped", rank_cap=8, **kw),
    ):
        assert bool(other.converged)
        np.testing.assert_allclose(other.low_rank, full.low_rank, atol=1e-7)
        np.testing.assert_allclose(other.sparse, full.sparse, atol=1e-7)


@pytest.mark.parametrize("method", ["fista", pytest.param("admm", marks=pytest.mark.slow)])
def test_binding_rank_cap_continues_with_the_exact_factorisation(x64, method):
    # The minimiser has rank 11 > cap 4: the capped solve stops at a wrong fixed
    # point and continues exactly, reaching the full-SVD minimiser (also in a vmap
    # batch where the other problem's cap does not bind).
    prob = reference.make_problem(8, n=16, p=24, q=4, rank=2, n_outliers=5, noise=0.02)
    kw = {"lam_block": 0.8, "tol": 1e-9, "method": method, "max_iter": 5000}
    full = cj.decompose(prob["updates"], lam_nuc=0.5, svd="full", **kw)
    capped = cj.decompose(prob["updates"], lam_nuc=0.5, rank_cap=4, **kw)
    assert int(full.rank) > 4 and bool(capped.converged)
    assert int(capped.rank) == int(full.rank)
    np.testing.assert_allclose(capped.low_rank, full.low_rank, atol=1e-6)
    np.testing.assert_allclose(capped.sparse, full.sparse, atol=1e-6)
    np.testing.assert_allclose(capped.objective, full.objective, rtol=1e-9)

    batch = jax.vmap(lambda lam: cj.decompose(prob["updates"], lam_nuc=lam, rank_cap=4, **kw))(
        jnp.array([0.5, 3.0])
    )
    alone = cj.decompose(prob["updates"], lam_nuc=3.0, rank_cap=4, **kw)
    assert int(alone.rank) < 4
    np.testing.assert_allclose(batch.low_rank[0], full.low_rank, atol=1e-6)
    np.testing.assert_allclose(batch.low_rank[1], alone.low_rank, atol=1e-9)
    assert int(batch.num_iters[1]) == int(alone.num_iters)
    # Objectives: exact continuation for the first, the capped basis for the second.
    np.testing.assert_allclose(batch.objective, [full.objective, alone.objective], rtol=1e-9)
    alone_full = cj.decompose(prob["updates"], lam_nuc=3.0, svd="full", **kw)
    np.testing.assert_allclose(alone.objective, alone_full.objective, rtol=1e-9)


@pytest.mark.slow
def test_binding_rank_cap_stops_the_capped_phase_after_the_patience(x64):
    """A cap that binds from the start: the capped phase ends after SATURATION_PATIENCE
    saturated iterations (it would only approach the wrong fixed point), so the whole
    solve takes exactly that many iterations more than the exact continuation alone,
    which starts where the capped phase stopped."""
    prob = reference.make_problem(8, n=16, p=24, q=4, rank=2, n_outliers=5, noise=0.02)
    x = prob["updates"]
    kw = {"lam_nuc": 0.5, "lam_block": 0.8, "tol": 1e-9, "max_iter": 5000}
    patience = problem_module.SATURATION_PATIENCE
    capped_phase = cj.decompose(x, rank_cap=1, diff="unrolled", **{**kw, "max_iter": patience})
    assert int(capped_phase.rank) == 1  # saturated in every one of the first iterations
    sol = cj.decompose(x, rank_cap=1, **kw)
    exact_from_there = cj.decompose(
        x, svd="full", init=(capped_phase.low_rank, capped_phase.sparse), **kw
    )
    assert int(sol.num_iters) == patience + int(exact_from_there.num_iters)
    np.testing.assert_allclose(sol.low_rank, exact_from_there.low_rank, atol=1e-9)


@pytest.mark.slow
def test_binding_rank_cap_unrolled_is_not_reported_as_converged(x64):
    prob = reference.make_problem(8, n=16, p=24, q=4, rank=2, n_outliers=5, noise=0.02)
    sol = cj.decompose(
        prob["updates"], lam_nuc=0.5, lam_block=0.8, rank_cap=4, diff="unrolled", max_iter=300
    )
    assert int(sol.rank) == 4 and not bool(sol.converged)


#: 128 singular values: 15 from 20 to 5, then 1.03 nearly tied with 112 of 1.0 (with
#: λ_* = 1.02 the minimiser has rank 16, the automatic cap).
NEAR_TIE_SPECTRUM_128 = np.concatenate([np.linspace(20, 5, 15), [1.03], np.full(112, 1.0)])


def near_tie_problem(n, p, q, spectrum, seed):
    """Blocks of ``M = U diag(spectrum) V^T`` (random orthonormal columns ``U``, ``V``)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(p, len(spectrum))))[0]
    v = np.linalg.qr(rng.normal(size=(n * q, len(spectrum))))[0]
    m = (u * spectrum) @ v.T
    return np.transpose(m.reshape(p, n, q), (1, 0, 2)), u, v


@pytest.mark.parametrize("method", [pytest.param("fista", marks=pytest.mark.slow), "admm"])
def test_rank_cap_does_not_miss_a_singular_value_tied_with_the_next(x64, method):
    """Singular values 10, 1.05, 1.0, ... with λ_* = 1.02 and S = 0: the minimiser is
    SVT_λ(M), of rank 2. A subspace of 2 columns mixes the 1.05 and 1.0 directions (a
    near-tie) and settled at rank 1 with L off by 3e-3, reported converged; the rank
    certificate sends it on to the exact factorisation. Unrolled (no continuation):
    reported as not converged."""
    spectrum = np.array([10, 1.05, 1.0, 0.5, 0.3, 0.1])
    x, u, v = near_tie_problem(5, 6, 3, spectrum, seed=15)
    lam = 1.02
    truth = (u * np.maximum(spectrum - lam, 0)) @ v.T
    kw = {"lam_nuc": lam, "lam_block": 1e3, "method": method, "tol": 1e-6}
    sol = cj.decompose(x, rank_cap=2, **kw)
    assert bool(sol.converged) and int(sol.rank) == 2
    np.testing.assert_allclose(cj.blocks_to_matrix(sol.low_rank), truth, atol=1e-5)
    unrolled = cj.decompose(x, rank_cap=2, diff="unrolled", max_iter=200, **kw)
    low_rank = np.asarray(cj.blocks_to_matrix(unrolled.low_rank))
    assert bool(unrolled.converged) == bool(np.allclose(low_rank, truth, atol=1e-5))


def test_automatic_rank_cap_does_not_miss_a_singular_value_tied_with_the_next(x64):
    """The same near-tie under svd="auto" (cap 16 for a 128 x 256 matrix): singular
    values 20 ... 5 (15 of them), 1.03, then 1.0 (112 times), λ_* = 1.02: rank 16.
    The capped solve stopped at rank 15 with L off by 2e-4 relative, reported converged."""
    spectrum = NEAR_TIE_SPECTRUM_128
    x, u, v = near_tie_problem(4, 128, 64, spectrum, seed=0)
    assert svt.auto_rank_cap((128, 256)) == 16 or jax.default_backend() == "tpu"
    truth = (u * np.maximum(spectrum - 1.02, 0)) @ v.T
    sol = cj.decompose(x, lam_nuc=1.02, lam_block=1e3)
    assert bool(sol.converged) and int(sol.rank) == 16
    low_rank = np.asarray(cj.blocks_to_matrix(sol.low_rank))
    assert np.linalg.norm(low_rank - truth) < 1e-5 * np.linalg.norm(truth)


def test_rank_cap_does_not_stop_before_its_kept_vectors_settle(x64):
    """Singular values 1.03, 1.0, 1.0, 0.99, ... with λ_* = 1.0005: rank 1, its vector
    barely separated from the next ones. The capped solve (cap 2) stopped at the right
    rank with L off by 2e-2 relative (its kept singular vector not converged), reported
    converged; the certificate's error bound sends it on to the exact factorisation."""
    spectrum = np.array([1.03, 1.0, 1.0, 0.99, 0.5, 0.3])
    x, u, v = near_tie_problem(5, 12, 4, spectrum, seed=4)
    truth = (u * np.maximum(spectrum - 1.0005, 0)) @ v.T
    kw = {"lam_nuc": 1.0005, "lam_block": 1e3, "method": "fista", "tol": 1e-7, "rank_cap": 2}
    sol = cj.decompose(x, **kw)
    assert bool(sol.converged) and int(sol.rank) == 1
    low_rank = np.asarray(cj.blocks_to_matrix(sol.low_rank))
    assert np.linalg.norm(low_rank - truth) < 1e-5 * np.linalg.norm(truth)
    unrolled = cj.decompose(x, diff="unrolled", max_iter=500, **kw)
    low_rank = np.asarray(cj.blocks_to_matrix(unrolled.low_rank))
    close = np.linalg.norm(low_rank - truth) < 1e-5 * np.linalg.norm(truth)
    assert bool(unrolled.converged) == bool(close)


@pytest.mark.parametrize("method", ["fista", "admm"])
def test_automatic_rank_cap_at_the_noise_edge_matches_the_full_svd(x64, method):
    """Low rank plus Gaussian noise with λ_* at 0.9 times the noise edge (a few noise
    directions kept, their singular values close to the bulk): the capped default
    stopped with L 5e-5 ||X|| away from the full-SVD solution (FISTA), reported
    converged; now within a few tol ||X||, like the full SVD's own accuracy."""
    n, p, q, r, sigma = 8, 128, 32, 4, 0.05
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(p, r)))[0]
    x = np.einsum("pr,nrq->npq", basis, rng.normal(size=(n, r, q)))
    x = x + sigma * rng.normal(size=(n, p, q))
    edge = sigma * (np.sqrt(p) + np.sqrt(n * q))
    kw = {"lam_nuc": 0.9 * edge, "lam_block": 2 * sigma * np.sqrt(p * q), "method": method}
    full = cj.decompose(x, svd="full", **kw)
    auto = cj.decompose(x, **kw)
    assert bool(auto.converged) and int(auto.rank) == int(full.rank) > r
    assert np.linalg.norm(auto.low_rank - full.low_rank) < 3e-6 * np.linalg.norm(x)


@pytest.mark.slow
def test_vmapped_lambda_grid_with_certified_rank_caps_returns_and_equals_a_loop(
    x64, tmp_path, run_python
):
    """jax.jit(jax.vmap(decompose)) over 12 λ's of the 128 x 256 near-tie problem under
    svd="auto" (some solves continue exactly, some not; cache-sized chunks of 8) never
    returned on XLA:CPU when the certificate ran batched (0% CPU). Run in a subprocess with a time
    limit, so that a hang fails the test instead of stalling the suite; the batch
    equals a loop of single solves."""
    lams = [0.5, 1.02, 1.01, 2.0, 6.0, 1.025, 0.99, 1.04, 3.0, 1.02, 0.7, 1.015]
    run_python(
        f"""
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        import clair_jax as cj
        from tests.test_decompose import NEAR_TIE_SPECTRUM_128, near_tie_problem
        x, _, _ = near_tie_problem(4, 128, 64, NEAR_TIE_SPECTRUM_128, seed=0)
        solve = lambda lam: cj.decompose(x, lam_nuc=lam, lam_block=1e3, method="fista")
        batch = jax.jit(jax.vmap(solve))(jax.numpy.asarray({lams!r}))
        np.savez({str(tmp_path / "batch.npz")!r}, low_rank=batch.low_rank,
                 num_iters=batch.num_iters, converged=batch.converged)
        """,
        timeout=600,
    )
    batch = np.load(tmp_path / "batch.npz")
    x, _, _ = near_tie_problem(4, 128, 64, NEAR_TIE_SPECTRUM_128, seed=0)
    for i, lam in enumerate(lams):
        alone = cj.decompose(x, lam_nuc=lam, lam_block=1e3, method="fista")
        assert bool(batch["converged"][i]) and bool(alone.converged)
        assert int(batch["num_iters"][i]) == int(alone.num_iters)
        np.testing.assert_allclose(batch["low_rank"][i], alone.low_rank, atol=1e-9)


def test_float32_by_default_and_float64_with_x64():
    x = reference.make_problem(0)["updates"]
    assert cj.decompose(x, **PEN).low_rank.dtype == jnp.float32
    with jax.enable_x64(True):
        assert cj.decompose(x, **PEN).low_rank.dtype == jnp.float64


def test_zero_data_gives_zero_solution():
    sol = cj.decompose(jnp.zeros((3, 4, 2)), lam_nuc=1.0, lam_block=1.0)
    assert bool(sol.converged) and int(sol.num_iters) == 1
    assert float(jnp.abs(sol.low_rank).max()) == 0.0


def test_non_convergence_is_reported():
    prob = reference.make_problem(0, noise=0.1)
    sol = cj.decompose(prob["updates"], tol=1e-12, max_iter=3, **PEN)
    assert int(sol.num_iters) == 3
    assert not bool(sol.converged)
    assert float(sol.residual) > 1e-12


@pytest.mark.parametrize("method", ["fista", "admm"])
def test_warm_start_from_solution_stops_at_once(x64, method):
    x = small_problem()["updates"]
    sol = cj.decompose(x, method=method, tol=1e-10, max_iter=10000, **PEN)
    again = cj.decompose(x, method=method, tol=1e-8, init=sol, **PEN)
    assert int(again.num_iters) <= 2 < int(sol.num_iters)


# --- jit, vmap, no recompilation --------------------------------------------------------


class TestTransforms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        x = jnp.asarray(small_problem()["updates"], jnp.float32)

        @self.variant
        def solve(x, lam_nuc, lam_block):
            return cj.decompose(x, lam_nuc=lam_nuc, lam_block=lam_block, offset=True)

        sol = solve(x, 1.0, 1.0)
        ref = cj.decompose(x, lam_nuc=1.0, lam_block=1.0, offset=True)
        chex.assert_trees_all_close(sol, ref, atol=1e-6)


@pytest.mark.slow
def test_jit_with_closed_over_concrete_arguments():
    """λ's and weights held as concrete jax.Arrays, closed over by a jitted function: their
    checks run in NumPy (jnp operations on them would be traced inside the jit)."""
    x = jnp.asarray(small_problem()["updates"], jnp.float32)
    lam_nuc, lam_block, weights = jnp.asarray(1.0), jnp.asarray(1.0), jnp.ones(x.shape[0])
    sol = jax.jit(lambda x: cj.decompose(x, lam_nuc=lam_nuc, lam_block=lam_block, weights=weights))(
        x
    )
    ref = cj.decompose(x, lam_nuc=1.0, lam_block=1.0)
    chex.assert_trees_all_close(sol, ref, atol=1e-6)
    bad = jnp.asarray(-1.0)  # caught in Python or at run time, with the same message
    with pytest.raises(Exception, match="lam_nuc must be finite and non-negative"):
        jax.block_until_ready(jax.jit(lambda x: cj.decompose(x, lam_nuc=bad, lam_block=1.0))(x))


def test_no_recompilation_on_second_call(rng):
    kw = {"lam_nuc": 1.0, "lam_block": 1.0, "method": "admm"}
    cj.decompose(rng.normal(size=(5, 6, 2)), **kw)
    before = decompose_module.solve_decomposition._cache_size()
    cj.decompose(rng.normal(size=(5, 6, 2)), lam_nuc=0.5, lam_block=2.0, method="admm")
    assert decompose_module.solve_decomposition._cache_size() == before

    @jax.jit
    @chex.assert_max_traces(n=1)
    def user_fn(x, lam):
        return cj.decompose(x, lam_nuc=lam, lam_block=1.0).low_rank

    user_fn(jnp.ones((5, 6, 2)), 1.0)
    user_fn(jnp.zeros((5, 6, 2)), 2.0)  # would raise on a second trace


@pytest.mark.parametrize("method", [pytest.param("fista", marks=pytest.mark.slow), "admm"])
def test_vmap_over_problems_equals_loop(method):
    # tol 1e-5, above float32's floor: batched and single kernels round differently,
    # and at tol=1e-6 a residual within rounding of tol can stop one of them an
    # iteration earlier (seen for ADMM in 1 of 16 seeds).
    xs = np.stack([small_problem(seed=s)["updates"] for s in range(4)]).astype(np.float32)
    kw = {"method": method, "offset": True, "tol": 1e-5, **PEN}
    batched = jax.vmap(lambda x: cj.decompose(x, **kw))(xs)
    for i, x in enumerate(xs):
        single = cj.decompose(x, **kw)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], batched), single, atol=2e-5, rtol=1e-5
        )


def test_vmap_over_lambda_grid_equals_loop():
    x = jnp.asarray(small_problem()["updates"], jnp.float32)
    grid = jnp.array([0.3, 0.6, 1.0, 2.0])
    batched = jax.vmap(lambda lam: cj.decompose(x, lam_nuc=lam, lam_block=1.0))(grid)
    for i, lam in enumerate(grid):
        single = cj.decompose(x, lam_nuc=lam, lam_block=1.0)
        np.testing.assert_allclose(batched.low_rank[i], single.low_rank, atol=2e-5)
        assert int(batched.num_iters[i]) == int(single.num_iters)


# --- gradients: implicit and unrolled against finite differences --------------------------


@pytest.mark.parametrize(
    "method,offset,diff,constrained",
    [
        ("fista", False, "implicit", False),
        pytest.param("fista", True, "implicit", False, marks=pytest.mark.slow),
        pytest.param("admm", True, "implicit", False, marks=pytest.mark.slow),
        ("fista", False, "unrolled", False),
        ("admm", False, "implicit", True),
        pytest.param("admm", True, "implicit", True, marks=pytest.mark.slow),
    ],
)
def test_gradients_match_finite_differences(x64, method, offset, diff, constrained):
    prob = small_problem(seed=1, noise=0.0 if constrained else 0.05)
    # Constrained: a lam_block where the solution map is smooth. In the exact-recovery
    # regime it has kinks (central differences change with eps there), see decompose's
    # docstring.
    lams = {"lam_nuc": 1.0, "lam_block": 0.6} if constrained else PEN
    g = np.random.default_rng(3).normal(size=prob["updates"].shape)

    def loss(x, lam_nuc, lam_block):
        sol = cj.decompose(
            x,
            lam_nuc=lam_nuc,
            lam_block=lam_block,
            method=method,
            offset=offset,
            constrained=constrained,
            tol=1e-12,
            max_iter=3000 if diff == "unrolled" else 20000,
            diff=diff,
        )
        value = jnp.sum(g * sol.low_rank) + jnp.sum(g**2 * sol.sparse)
        return value + (jnp.sum(sol.offset) if offset else 0.0)

    args = (jnp.asarray(prob["updates"]), lams["lam_nuc"], lams["lam_block"])
    check_grads(loss, args, order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_forward_mode_needs_the_unrolled_derivative(x64):
    """The implicit derivative is a custom VJP (reverse mode only: jvp is a TypeError,
    as documented); the unrolled one has both modes, and they agree."""
    prob = small_problem(seed=2, noise=0.05)
    x = jnp.asarray(prob["updates"])
    dx = jnp.asarray(np.random.default_rng(4).normal(size=x.shape))

    def loss(u, diff):
        sol = cj.decompose(u, **PEN, diff=diff, tol=1e-12, max_iter=400)
        return jnp.sum(sol.low_rank**2) + jnp.sum(sol.sparse)

    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda u: loss(u, "implicit"), (x,), (dx,))
    _, forward = jax.jvp(lambda u: loss(u, "unrolled"), (x,), (dx,))
    reverse = jnp.vdot(jax.grad(loss)(x, "unrolled"), dx)
    np.testing.assert_allclose(forward, reverse, rtol=1e-8)


def test_unrolled_gradient_on_exactly_low_rank_data_is_finite_for_every_backend(x64):
    """float64, wide M: ``svd="auto"`` picks the Gram route, whose eigh autodiff divides by
    eigenvalue gaps (NaN for the repeated zero eigenvalues of rank-2 data); it uses the
    closed-form SVT derivative instead, so it must agree with the full SVD's."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(8, 2))
    x = jnp.asarray(np.einsum("pr,nrq->npq", u, rng.normal(size=(6, 2, 4))))
    assert svt.resolve_backend((8, 24), "auto", None, x.dtype, unrolled=True)[0] == "gram"

    def grad(backend):
        def loss(x):
            sol = cj.decompose(
                x, lam_nuc=0.1, lam_block=0.5, svd=backend, diff="unrolled", max_iter=50
            )
            return jnp.sum(sol.low_rank**2) + jnp.sum(sol.sparse)

        return jax.grad(loss)(x)

    full = grad("full")
    assert bool(jnp.all(jnp.isfinite(full)))
    for backend in ("auto", "gram"):
        np.testing.assert_allclose(grad(backend), full, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "rank_cap",
    [None, pytest.param(6, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow)],
)
def test_gradient_of_objective_wrt_lambda_is_the_penalty(x64, rank_cap):
    """Envelope theorem: d objective / d lam_nuc = ||L*||_* (a closed form).

    With a rank cap the objective's nuclear norm comes from the capped basis (cap
    6) or, where the cap binds (cap 1, rank 3), from the exact continuation.
    """
    x = jnp.asarray(small_problem()["updates"])
    kw = {"lam_block": 1.0, "tol": 1e-12, "max_iter": 20000, "rank_cap": rank_cap}
    grad = jax.grad(lambda lam: cj.decompose(x, lam_nuc=lam, **kw).objective)(1.0)
    sol = cj.decompose(x, lam_nuc=1.0, **kw)
    singular_values = np.linalg.svd(np.asarray(cj.blocks_to_matrix(sol.low_rank)), compute_uv=False)
    assert 1 < int(np.sum(singular_values > 1e-8)) < 6
    np.testing.assert_allclose(float(grad), singular_values.sum(), rtol=1e-6)


def test_auto_caps_the_rank_of_large_matrices_and_matches_full_svd(x64):
    # M is 128 x 128: "auto" runs the rank-capped factorisation (off TPU) and lands
    # on the full-SVD minimiser.
    prob = reference.make_problem(9, n=8, p=128, q=16, rank=3, n_outliers=2, noise=0.01)
    assert svt.auto_rank_cap((128, 128)) in (None, svt.AUTO_RANK_CAP)
    kw = {"lam_nuc": 2.0, "lam_block": 2.0, "tol": 1e-9, "max_iter": 5000}
    auto = cj.decompose(prob["updates"], **kw)
    full = cj.decompose(prob["updates"], svd="full", **kw)
    assert bool(auto.converged) and int(auto.rank) == int(full.rank)
    np.testing.assert_allclose(auto.low_rank, full.low_rank, atol=1e-6)
    np.testing.assert_allclose(auto.sparse, full.sparse, atol=1e-6)


@pytest.mark.slow
def test_gradients_are_finite_for_exactly_low_rank_and_zero_data(x64):
    """Exactly low-rank data (repeated zero singular values) and zero data.

    Implicit differentiation linearises with the SVT's closed-form JVP, finite
    there, whatever the solve's backend (here the Gram route, whose own eigh JVP
    is NaN on such data); the gradient matches finite differences on exactly
    rank-2 data.
    """
    rng = np.random.default_rng(4)
    u = np.linalg.qr(rng.normal(size=(12, 2)))[0]
    x = jnp.asarray(np.einsum("pr,nrq->npq", u, rng.normal(size=(6, 2, 3))))
    kw = {"lam_nuc": 0.5, "lam_block": 1.0, "svd": "gram", "tol": 1e-12, "max_iter": 20000}

    def loss(x):
        return jnp.sum(cj.decompose(x, **kw).low_rank ** 2)

    check_grads(loss, (x,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)
    zero = jax.grad(lambda x: cj.decompose(x, **kw).objective)(jnp.zeros((4, 12, 3)))
    np.testing.assert_array_equal(zero, 0.0)


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 2])
@pytest.mark.slow
def test_cache_sized_cpu_batches_equal_a_loop(x64, monkeypatch, chunk):
    # A vmapped solve on CPU runs in chunks of `chunk` problems (here 5 problems: with
    # a remainder for chunk 2); values and gradients must equal one solve at a time.
    rng = np.random.default_rng(21)
    xs = jnp.asarray(rng.normal(size=(5, 4, 5, 2 + chunk)))  # shapes unique to this test
    per_problem = xs[0].size * xs.dtype.itemsize
    monkeypatch.setattr(decompose_module, "CPU_CHUNK_BYTES", chunk * per_problem)

    def solve(x, lam):
        return cj.decompose(x, lam_nuc=lam, lam_block=0.4, method="admm", tol=1e-10)

    lams = jnp.linspace(0.8, 1.2, 5)
    batched = jax.vmap(solve)(xs, lams)
    for i in range(5):
        one = solve(xs[i], lams[i])
        np.testing.assert_allclose(batched.low_rank[i], one.low_rank, atol=1e-12)
        np.testing.assert_allclose(batched.sparse[i], one.sparse, atol=1e-12)
        assert int(batched.num_iters[i]) == int(one.num_iters)

    def loss(x, lam):
        return jnp.sum(solve(x, lam).low_rank ** 2)

    g_x, g_lam = jax.vmap(jax.grad(loss, argnums=(0, 1)))(xs, lams)
    for i in range(5):
        one_x, one_lam = jax.grad(loss, argnums=(0, 1))(xs[i], lams[i])
        np.testing.assert_allclose(g_x[i], one_x, atol=1e-8)
        np.testing.assert_allclose(g_lam[i], one_lam, atol=1e-8)


@pytest.mark.parametrize("scale", [1e-6, 1e8])
def test_constrained_solution_depends_on_the_lambda_ratio_only(x64, scale):
    """The constrained problem is invariant to a common scale of the λ's; the starting
    penalty used to ignore λ_*, so λ's of 1e-6 stopped after one iteration at a wrong
    point reported as converged, and 1e8 never converged."""
    x = np.random.default_rng(3).standard_normal((5, 4, 3))
    kw = {"method": "admm", "constrained": True}
    ref = cj.decompose(x, lam_nuc=1.0, lam_block=0.7, **kw)
    sol = cj.decompose(x, lam_nuc=scale, lam_block=0.7 * scale, **kw)
    assert bool(sol.converged) and int(sol.num_iters) == int(ref.num_iters)
    np.testing.assert_allclose(sol.low_rank, ref.low_rank, atol=1e-9)
    np.testing.assert_allclose(sol.objective / scale, ref.objective, rtol=1e-9)


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "admm"},
        {"method": "admm", "offset": True},
        {"method": "admm", "constrained": True},
        {"method": "fista"},
        {"method": "fista", "offset": True, "svd": "gram"},
    ],
    ids=["admm", "admm-offset", "admm-constrained", "fista", "fista-offset-gram"],
)
@pytest.mark.parametrize("power", [-300, -40, 3, 40, 300])
def test_scaling_by_a_power_of_two_scales_the_solution_exactly(x64, kw, power):
    """``decompose(2^k X, 2^k λ) = 2^k decompose(X, λ)``, bit for bit: the iterations run
    on the data normalised by a power of two. Without it, the penalised ADMM's iterates
    depend on the data's scale (its penalty ``1.25 / ||M||_2`` meets the misfit's unit
    curvature in ``(1 + μ) / μ``)."""
    x = np.asarray(small_problem(seed=4)["updates"])
    lams = CON if kw.get("constrained") else PEN
    ref = cj.decompose(x, **lams, **kw)
    factor = 2.0**power
    sol = cj.decompose(x * factor, **{k: v * factor for k, v in lams.items()}, **kw)
    assert int(sol.num_iters) == int(ref.num_iters) and bool(sol.converged)
    np.testing.assert_array_equal(sol.low_rank, ref.low_rank * factor)
    np.testing.assert_array_equal(sol.sparse, ref.sparse * factor)
    if kw.get("offset"):
        np.testing.assert_array_equal(sol.offset, ref.offset * factor)
    np.testing.assert_array_equal(sol.objective, ref.objective * factor**2)
    assert float(sol.residual) == float(ref.residual)


@pytest.mark.parametrize("method", ["fista", "admm"])
@pytest.mark.parametrize("scale", [1e-15, 1e18])
def test_float32_data_far_from_unit_scale_are_solved(method, scale):
    """float32 data of size 1e-15 used to underflow the residual's squares and 1e18 to
    overflow ||X||^2; ADMM's penalty (1 / ||M||_2) rounded 1 + μ to μ. Each stopped
    "converged" at a wrong point (L off by 18% of its size)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 10, 4)), jnp.float32)
    ref = cj.decompose(x, lam_nuc=1.0, lam_block=1.0, method=method)
    sol = cj.decompose(x * scale, lam_nuc=scale, lam_block=scale, method=method)
    assert bool(sol.converged) and bool(ref.converged)
    size = float(jnp.max(jnp.abs(ref.low_rank)))
    np.testing.assert_allclose(sol.low_rank / scale, ref.low_rank, atol=1e-4 * size)
    np.testing.assert_allclose(sol.sparse / scale, ref.sparse, atol=1e-4 * size)
    np.testing.assert_allclose(sol.objective / scale**2, ref.objective, rtol=1e-4)


@pytest.mark.parametrize("method", ["fista", "admm"])
@pytest.mark.parametrize("offset", [False, True])
def test_float32_data_at_the_top_of_the_range_are_solved(method, offset):
    """Data near float32's largest number: the working scale 2^128 used to be formed
    (inf: NaN parts reported converged), and with an offset the blocks' sum overflowed
    before centring (40 clients of 2e37)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(40, 6, 3))
    x = jnp.asarray(x / np.abs(x).max(), jnp.float32)  # max |x| = 1
    ref = cj.decompose(x, lam_nuc=1.0, lam_block=1.0, method=method, offset=offset)
    for scale in (2.0**127, 2.0**127 * 1.5):  # max |X| = 1.7e38, 2.6e38
        sol = cj.decompose(x * scale, lam_nuc=scale, lam_block=scale, method=method, offset=offset)
        assert bool(sol.converged) and abs(int(sol.num_iters) - int(ref.num_iters)) <= 2
        # (in float64: float32 would divide by the subnormal 2^-127 flushed to zero)
        for name in ("low_rank", "sparse") + (("offset",) if offset else ()):
            got = np.asarray(getattr(sol, name), np.float64) / scale
            np.testing.assert_allclose(got, getattr(ref, name), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["fista", "admm"])
def test_a_common_base_weight_does_not_change_the_offset_solution(x64, method):
    """The unpenalised offset absorbs a common W_0; the residuals used to be relative to
    ||X||_F, W_0 included, so a large W_0 loosened the tolerance (FISTA's L off by 1.5%)."""
    rng = np.random.default_rng(0)
    x, w0 = rng.standard_normal((6, 5, 4)), rng.standard_normal((5, 4))
    kw = {"lam_nuc": 1.0, "lam_block": 1.0, "offset": True, "method": method}
    ref = cj.decompose(x, **kw)
    sol = cj.decompose(x + 1000.0 * w0, **kw)
    np.testing.assert_allclose(sol.low_rank, ref.low_rank, atol=1e-9)
    np.testing.assert_allclose(sol.sparse, ref.sparse, atol=1e-9)
    np.testing.assert_allclose(sol.offset, ref.offset + 1000.0 * w0, atol=1e-8)


@pytest.mark.parametrize("method,constrained", [("fista", False), ("admm", False), ("admm", True)])
def test_a_large_common_base_weight_converges_in_float32(method, constrained):
    """float32, W_0 100x the clients' differences: the solve works on the centred blocks,
    so rounding relative to ||W_0|| no longer floors the residual (every method used to
    stop at max_iter unconverged), and the answer is the one without W_0, shifted."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 12, 5)).astype(np.float32)
    w0 = 100.0 * rng.standard_normal((12, 5)).astype(np.float32)
    kw = {"lam_nuc": 2.0, "lam_block": 1.5, "offset": True, "method": method}
    kw["constrained"] = constrained
    ref = cj.decompose(x, **kw)
    sol = cj.decompose(x + w0, **kw)
    assert bool(ref.converged) and bool(sol.converged)
    assert sol.offset.dtype == jnp.float32
    np.testing.assert_allclose(sol.objective, ref.objective, rtol=1e-5)
    if not constrained:
        # (The constrained optimum's offset, a geometric-median-like point, is only
        # determined to about 1e-4 at tol=1e-6: its objective is flat there.)
        np.testing.assert_allclose(sol.low_rank, ref.low_rank, atol=1e-4)
        np.testing.assert_allclose(sol.sparse, ref.sparse, atol=1e-4)
        np.testing.assert_allclose(sol.offset, ref.offset + w0, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("method", [pytest.param("fista", marks=pytest.mark.slow), "admm"])
@pytest.mark.slow
def test_unrolled_rank_capped_gradients_on_low_rank_and_zero_data(x64, method):
    """Autodiff through the capped map's QR and SVD gave gradients of 1e86 (rank-1 data,
    cap 3) and NaN (zero data); it now uses the exact SVT's closed-form derivative.
    Unrolled ADMM's starting penalty (a norm) also had a NaN derivative at zero data."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(np.einsum("pr,nrq->npq", rng.normal(size=(6, 1)), rng.normal(size=(5, 1, 3))))
    kw = {"lam_block": 0.8, "method": method, "max_iter": 300}
    capped = {"svd": "rank_capped", "rank_cap": 3, "diff": "unrolled", **kw}

    implicit = jax.grad(lambda lam: cj.decompose(x, lam_nuc=lam, **kw).objective)(0.3)
    unrolled = jax.grad(lambda lam: cj.decompose(x, lam_nuc=lam, **capped).objective)(0.3)
    np.testing.assert_allclose(unrolled, implicit, rtol=1e-8)
    for options in (capped, {**kw, "diff": "unrolled"}):
        zero = jax.grad(lambda u, o=options: jnp.sum(cj.decompose(u, lam_nuc=0.3, **o).low_rank))(
            jnp.zeros_like(x)
        )
        assert bool(jnp.all(jnp.isfinite(zero)))


@pytest.mark.slow
def test_implicit_gradient_of_a_singular_fixed_point_system_is_an_error(x64):
    """Both λ's zero in the constrained form: every split of X is a solution, the
    fixed-point system is singular, and GMRES broke down into a silent NaN gradient."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4, 3)))

    def loss(u):
        sol = cj.decompose(u, lam_nuc=0.0, lam_block=0.0, method="admm", constrained=True)
        return jnp.sum(sol.low_rank)

    with pytest.raises(Exception, match="implicit differentiation failed"):
        jax.block_until_ready(jax.grad(loss)(x))
    # The same solve differentiated through its iterations is finite.
    unrolled = jax.grad(
        lambda u: jnp.sum(
            cj.decompose(
                u, lam_nuc=0.0, lam_block=0.0, method="admm", constrained=True,
                diff="unrolled", max_iter=50,
            ).low_rank
        )
    )(x)  # fmt: skip
    assert np.isfinite(np.asarray(unrolled)).all()
