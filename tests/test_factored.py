"""Factored server math: factored == dense (float64), n·r < p detection, factored aggregators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax._src.aggregators import factored as fag
from clair_jax._src.clair import factored as fcl
from clair_jax._src.solvers import factored as fd


def lora_federation(seed, n, p, q, r, bad=(), noise=0.01, coordinated=()):
    """Clients share one ``B`` (plus noise) with their own ``A``; ``bad`` get unrelated
    random ``B``'s, ``coordinated`` one common random update ``B' A'``."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(p, r))
    b = shared[None] + noise * rng.normal(size=(n, p, r))
    a = rng.normal(size=(n, r, q)) / np.sqrt(q)
    for i in bad:
        b[i] = rng.normal(size=(p, r))
    if coordinated:
        b_c, a_c = rng.normal(size=(p, r)), rng.normal(size=(r, q)) / np.sqrt(q)
        for i in coordinated:
            b[i], a[i] = b_c, a_c
    return b, a


def rel(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300)


# --- exact equivalence of the decomposition -------------------------------------------------


@pytest.mark.parametrize(
    ("method", "offset"),
    [("admm", False), pytest.param("fista", True, marks=pytest.mark.slow)],
)
def test_decompose_factored_equals_dense(x64, method, offset):
    b, a = lora_federation(0, n=8, p=20, q=18, r=2, bad=(0, 1), noise=0.05)
    x = np.einsum("npr,nrq->npq", b, a)
    lams = {"lam_nuc": 0.3, "lam_block": 0.4}
    kw = {"method": method, "tol": 1e-11, "max_iter": 20000, "offset": offset}
    dense = cj.decompose(x, **lams, **kw)
    fac = fd.decompose_factored(cj.LoRAFactors(b, a), **lams, **kw)
    assert bool(dense.converged) and bool(fac.decomposition.converged)
    assert np.asarray(cj.decompose(x, **lams, **kw).sparse).any()  # S is active
    assert rel(fac.low_rank_dense(), dense.low_rank) < 1e-6
    assert rel(fac.sparse_dense(), dense.sparse) < 1e-6
    np.testing.assert_allclose(fac.decomposition.objective, dense.objective, rtol=1e-9)
    np.testing.assert_allclose(
        fac.block_norms(), np.linalg.norm(dense.sparse, axis=(1, 2)), atol=1e-6 * np.abs(x).max()
    )
    if offset:
        assert rel(fac.offset_dense(), dense.offset) < 1e-6


def test_coordinates_are_exact_and_nan_free_with_rank_deficient_factors(x64):
    rng = np.random.default_rng(1)
    n, p, q, r = 8, 20, 18, 3
    b = np.broadcast_to(rng.normal(size=(p, r)), (n, p, r)).copy()  # one shared B
    b[:, :, 2] = b[:, :, 0]  # and rank deficient
    b[5] = 0.0  # an idle client
    a = rng.normal(size=(n, r, q))
    x = np.einsum("npr,nrq->npq", b, a)
    for common in (False, True):
        fc = fd.factored_coordinates(cj.LoRAFactors(b, a), common_right=common)
        assert np.isfinite(np.asarray(fc.coords)).all()
        np.testing.assert_allclose(fd.lift(fc.left, fc.coords, fc.right), x, atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(fc.left).T @ fc.left, np.eye(fc.left.shape[1]), atol=1e-12
        )
    kw = {"lam_nuc": 0.5, "lam_block": 1.0, "tol": 1e-11, "max_iter": 20000}
    fac = fd.decompose_factored(cj.LoRAFactors(b, a), **kw)
    dense = cj.decompose(x, **kw)
    assert np.isfinite(np.asarray(fac.decomposition.low_rank)).all()
    assert rel(fac.low_rank_dense(), dense.low_rank) < 1e-6


@pytest.mark.parametrize("deficient", [False, True])
def test_coordinates_from_the_common_right_frame_are_exact(x64, deficient):
    """With the common frame given, client i's R factor comes from A_i V_A: R^T R = A_i A_i^T,
    and C_i = (U^T B_i) R_i^T has the singular values of X_i (C_i = U^T X_i V_i)."""
    rng = np.random.default_rng(2)
    n, p, q, r = 6, 30, 25, 3
    b, a = rng.normal(size=(n, p, r)), rng.normal(size=(n, r, q))
    if deficient:
        a[:, 2] = a[:, 0]  # rank-deficient A's
        a[4] = 0.0  # an idle client
    frame = fd.common_right_basis(jnp.asarray(a))
    fc = fd.factored_coordinates(cj.LoRAFactors(b, a), right_frame=frame)
    assert fc.right is None
    alpha = np.asarray(fc.right_coef)
    np.testing.assert_allclose(alpha @ np.swapaxes(alpha, 1, 2), a @ np.swapaxes(a, 1, 2),
                               atol=1e-12)  # fmt: skip
    x = np.einsum("npr,nrq->npq", b, a)
    for i in range(n):
        want = np.linalg.svd(x[i], compute_uv=False)[:r]
        got = np.linalg.svd(np.asarray(fc.coords[i]), compute_uv=False)[:r]
        np.testing.assert_allclose(got, want, atol=1e-12)
    plain = fd.factored_coordinates(cj.LoRAFactors(b, a))
    np.testing.assert_allclose(fc.left_coef, plain.left_coef, atol=0)
    with pytest.raises(ValueError, match="common_right=False"):
        fd.factored_coordinates(cj.LoRAFactors(b, a), common_right=True, right_frame=frame)
    # checked=True takes working_factors' output as it is: the same coordinates.
    checked = fd.factored_coordinates(
        cj.LoRAFactors(*fd.working_factors((b, a))), right_frame=frame, checked=True
    )
    for got, want in zip(checked, fc, strict=True):
        if want is not None:
            np.testing.assert_array_equal(got, want)


def test_decompose_factored_rejects_column_sparsity():
    b, a = lora_federation(0, n=3, p=5, q=4, r=1)
    with pytest.raises(ValueError, match="sparsity='block'"):
        fd.decompose_factored(cj.LoRAFactors(b, a), lam_nuc=1.0, lam_block=1.0, sparsity="column")


# --- clair_factored --------------------------------------------------------------------------


def test_clair_factored_equals_dense_with_the_same_statistics(x64):
    """Given λ's and σ, every other step of CLAIR is invariant under the lift."""
    offset = False
    b, a = lora_federation(2, n=10, p=24, q=20, r=2, bad=(0, 1), noise=0.05)
    x = np.einsum("npr,nrq->npq", b, a)
    stats = {"lam_nuc": 0.5, "lam_block": 0.6, "noise_scale": 0.05, "tol": 1e-10}
    dense = cj.clair(x, offset=offset, **stats)
    fac = fcl.clair_factored(cj.LoRAFactors(b, a), offset=offset, **stats)
    np.testing.assert_array_equal(fac.collaborative, dense.collaborative)
    assert not bool(np.asarray(dense.collaborative)[:2].any())
    assert int(fac.rank) == int(dense.rank)
    np.testing.assert_allclose(fac.scores, dense.scores, rtol=1e-6)
    np.testing.assert_allclose(fac.threshold, dense.threshold, rtol=1e-6)
    assert rel(fac.refined.dense(), dense.refined) < 1e-6
    rank = int(dense.rank)
    proj_d = np.asarray(dense.basis)[:, :rank] @ np.asarray(dense.basis)[:, :rank].T
    proj_f = np.asarray(fac.basis)[:, :rank] @ np.asarray(fac.basis)[:, :rank].T
    np.testing.assert_allclose(proj_f, proj_d, atol=1e-6)


@pytest.mark.parametrize(
    "scale",
    [1.0, pytest.param(1e-3, marks=pytest.mark.slow), pytest.param(1e3, marks=pytest.mark.slow)],
)
def test_clair_factored_detects_when_nr_is_below_p(scale):
    """The measured failure's regime (n r < min(p, q), exact products), float32,
    at three scales: every unrelated client flagged (4 of 4), no benign one."""
    n, p, q, r = 12, 96, 96, 4
    b, a = lora_federation(3, n=n, p=p, q=q, r=r, bad=(0, 1, 2, 3))
    truth = np.arange(n) < 4
    res = fcl.clair_factored(
        cj.LoRAFactors(jnp.asarray(b * scale, jnp.float32), jnp.asarray(a, jnp.float32)),
        benign_majority=True,
    )
    np.testing.assert_array_equal(~np.asarray(res.collaborative), truth)
    assert int(res.rank) == r
    assert np.isfinite(float(res.noise_scale)) and float(res.noise_scale) > 0


def test_clair_factored_flags_a_coordinated_group():
    n, p, q, r = 12, 96, 96, 4
    b, a = lora_federation(4, n=n, p=p, q=q, r=r, coordinated=(0, 1, 2))
    res = fcl.clair_factored(
        cj.LoRAFactors(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32)),
        benign_majority=True,
    )
    np.testing.assert_array_equal(~np.asarray(res.collaborative), np.arange(n) < 3)


# --- aggregators -----------------------------------------------------------------------------


def adapters(seed, n=8, shapes=(("q", 16, 12),), r=2, bad=(0,)):
    clients, global_ = {}, {}
    for j, (name, p, q) in enumerate(shapes):
        b, a = lora_federation(seed + j, n=n, p=p, q=q, r=r, bad=bad, noise=0.05)
        clients[name] = cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a))
        global_[name] = cj.LoRAFactors(jnp.zeros((p, r)), jnp.zeros((r, q)))
    return clients, global_


def call(agg, clients, global_, w, **kw):
    return agg.aggregate(clients, global_, w, jnp.int32(1), jax.random.key(0), **kw)


def products(f):
    return np.einsum("...pr,...rq->...pq", np.asarray(f.B), np.asarray(f.A))


def test_flexlora_factored_equals_flexlora(x64):
    clients, global_ = adapters(5)
    w = jnp.arange(1.0, 9.0)
    dense = call(cj.flexlora(), clients, global_, w)
    fac = call(fag.flexlora_factored(), clients, global_, w)
    for name in clients:
        np.testing.assert_allclose(
            products(fac.global_[name]), products(dense.global_[name]), atol=1e-10
        )
        np.testing.assert_allclose(
            fac.diagnostics[f"aggregation_error/{name}"],
            dense.diagnostics[f"aggregation_error/{name}"],
            rtol=1e-8,
        )


def _flexlora_case(case):
    """Clients' ``(B, A, p)`` and the rank: generic, duplicated and zero clients, a product of
    rank below ``r``, fewer rows than the rank."""
    rng = np.random.default_rng(11)
    n, p, q, r = 6, 14, 11, 3
    b, a = rng.normal(size=(n, p, r)), rng.normal(size=(n, r, q))
    if case == "duplicated_and_zero":
        b[1], a[1] = b[0], a[0]
        b[2] = 0.0
        a[3] = 0.0
    elif case == "rank_below_r":  # every B_i A_i = x_i y^T: the product has rank 1 < r
        x, y = rng.normal(size=(n, p)), rng.normal(size=q)
        b = np.zeros((n, p, r))
        a = np.zeros((n, r, q))
        b[:, :, 0], a[:, 0, :] = x, y
    elif case == "fewer_rows_than_rank":
        b = b[:, :2]
    elif case == "all_zero":
        b = np.zeros_like(b)
    weights = rng.uniform(0.5, 2.0, size=n)
    return b, a, weights / weights.sum(), r


@pytest.mark.parametrize(
    "case", ["generic", "duplicated_and_zero", "rank_below_r", "fewer_rows_than_rank", "all_zero"]
)
def test_weighted_product_error_matches_numpy_svd(x64, case):
    """Best rank-r factors of Σ p_i B_i A_i and the discarded tail, against NumPy's SVD of
    the dense product; balanced (B^T B = A A^T = Σ_r), finite where the rank is deficient."""
    from clair_jax._src.aggregators.factor_algebra import weighted_product_error

    b, a, w, r = _flexlora_case(case)
    dense = np.einsum("n,npr,nrq->pq", w, b, a)
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    s_r = np.pad(s, (0, r))[:r]
    best = (u[:, :r] * s[:r]) @ vt[:r]
    tail = np.sqrt(np.sum(s[r:] ** 2))
    got, err = weighted_product_error(cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a)), w)
    gb, ga = np.asarray(got.B), np.asarray(got.A)
    assert gb.shape == (b.shape[1], r) and ga.shape == (r, a.shape[2])
    assert np.isfinite(gb).all() and np.isfinite(ga).all()
    scale = max(s[0], 1e-300)
    np.testing.assert_allclose(gb @ ga, best, atol=1e-12 * scale)
    np.testing.assert_allclose(float(err), tail, atol=1e-12 * scale)
    np.testing.assert_allclose(gb.T @ gb, np.diag(s_r), atol=1e-12 * scale)
    np.testing.assert_allclose(ga @ ga.T, np.diag(s_r), atol=1e-12 * scale)


def test_weighted_product_error_float32_is_close_to_float64():
    """float32 factors: the product and the tail within float32 rounding of NumPy's float64."""
    from clair_jax._src.aggregators.factor_algebra import weighted_product_error

    b, a, w, r = _flexlora_case("duplicated_and_zero")
    dense = np.einsum("n,npr,nrq->pq", w, b, a)
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    got, err = weighted_product_error(
        cj.LoRAFactors(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32)),
        jnp.asarray(w, jnp.float32),
    )
    assert got.B.dtype == jnp.float32 and got.A.dtype == jnp.float32
    best = (u[:, :r] * s[:r]) @ vt[:r]
    np.testing.assert_allclose(np.asarray(got.B) @ np.asarray(got.A), best, atol=1e-5 * s[0])
    np.testing.assert_allclose(float(err), np.sqrt(np.sum(s[r:] ** 2)), atol=1e-5 * s[0])


@pytest.mark.slow
@pytest.mark.parametrize("make", [cj.fedit, lambda: cj.fedrot(0.5)])
def test_factored_errors_equal_dense_errors(x64, make):
    clients, global_ = adapters(6)
    w = jnp.ones(8)
    global_ = {k: cj.LoRAFactors(f.B[1], f.A[1]) for k, f in clients.items()}
    dense = call(make(), clients, global_, w)
    fac = call(fag.with_factored_errors(make()), clients, global_, w)
    assert set(fac.diagnostics) == set(dense.diagnostics)
    for key, value in dense.diagnostics.items():
        np.testing.assert_allclose(fac.diagnostics[key], value, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_clair_aggregator_factored_equals_dense(x64):
    """Round updates, shared row space, pooled client detection, flagged -> global: with
    the same statistics (λ's, σ, and the rank, which the benign-majority refit would
    otherwise set from the matrix dimensions) the factored rule is the dense one."""
    kw = {"measure": "update", "shared_space": "row", "detection": "client", "flagged": "global"}
    clients, global_ = adapters(7)
    w = jnp.arange(1.0, 9.0)
    extra = {}
    if kw.get("measure") == "update":
        start, _ = adapters(17, bad=())
        extra["start"] = start
    stats = {"lam_nuc": 0.4, "lam_block": 0.5, "noise_scale": 0.05, "tol": 1e-10, "rank": 2}
    dense = call(
        cj.clair_aggregator(**kw, **stats, server_math="dense"), clients, global_, w, **extra
    )
    fac = call(fag.clair_aggregator_factored(**kw, **stats), clients, global_, w, **extra)
    np.testing.assert_array_equal(fac.flagged, dense.flagged)
    for name in clients:
        np.testing.assert_allclose(
            products(fac.clients[name]), products(dense.clients[name]), atol=1e-7
        )
        np.testing.assert_allclose(
            products(fac.global_[name]), products(dense.global_[name]), atol=1e-8
        )
        for key in ("aggregation_error", "scores", "rank"):
            np.testing.assert_allclose(
                fac.diagnostics[f"{key}/{name}"], dense.diagnostics[f"{key}/{name}"], rtol=1e-6
            )


def assert_best_rank_matches_svd(shared, ys, zs, rank, factors):
    """``factors = (s, left, right)`` are the leading ``rank`` singular triplets of every
    ``shared + ys[i] @ zs[i].T`` (NumPy SVD)."""
    s, left, right = (np.asarray(x) for x in factors)
    for i in range(ys.shape[0]):
        u, sv, vt = np.linalg.svd(shared + ys[i] @ zs[i].T)
        np.testing.assert_allclose(s[i], sv[:rank], rtol=1e-8)
        approx = (left[i] * s[i]) @ right[i].T
        np.testing.assert_allclose(approx, (u[:, :rank] * sv[:rank]) @ vt[:rank], atol=1e-8)


@pytest.mark.slow
def test_best_rank_factors_krylov_matches_svd(x64):
    """The Rayleigh–Ritz path (frame larger than its subspace) against dense SVDs."""
    rng = np.random.default_rng(8)
    k, m, c, n, rank = 60, 70, 3, 4, 3
    shared = (rng.normal(size=(k, 4)) * [8.0, 6.0, 5.0, 4.0]) @ rng.normal(size=(4, m)) / 8
    shared = shared + 0.01 * rng.normal(size=(k, m))
    ys, zs = rng.normal(size=(n, k, c)), rng.normal(size=(n, m, c)) / 3
    s, left, right = fag._best_rank_factors(
        jnp.asarray(shared), jnp.asarray(ys), jnp.asarray(zs), rank
    )
    assert_best_rank_matches_svd(shared, ys, zs, rank, (s, left, right))


def test_best_rank_factors_krylov_matches_svd_when_the_shared_part_is_orthogonal(x64):
    """``orthogonal=True`` (``F^T Y_i = 0``, ``Y_i`` one orthonormal basis: the adapters'
    refinement) against dense SVDs, on a frame larger than its Krylov space."""
    rng = np.random.default_rng(9)
    k, m, c, n, rank = 60, 70, 3, 4, 3
    basis = np.linalg.qr(rng.normal(size=(k, c)))[0]
    shared = (rng.normal(size=(k, 4)) * [8.0, 6.0, 5.0, 4.0]) @ rng.normal(size=(4, m)) / 8
    shared = shared + 0.01 * rng.normal(size=(k, m))
    shared = shared - basis @ (basis.T @ shared)
    ys = np.broadcast_to(basis, (n, k, c))
    zs = rng.normal(size=(n, m, c)) * [3.0, 2.0, 1.0]
    s, left, right = fag._best_rank_factors(
        jnp.asarray(shared), jnp.asarray(ys), jnp.asarray(zs), rank, orthogonal=True
    )
    assert_best_rank_matches_svd(shared, ys, zs, rank, (s, left, right))


@pytest.mark.parametrize(
    "kw",
    [
        {"offset": True, "shared_space": "row"},
        pytest.param(
            {"offset": True, "measure": "update", "detection": "client"}, marks=pytest.mark.slow
        ),
    ],
)
def test_clair_aggregator_default_equals_dense_where_coordinates_are_rotated_products(x64, kw):
    """``n r >= p`` and, with an offset, ``n r >= q``: the coordinates are the products
    rotated, so the default (factored) rule with its own statistics is the dense rule."""
    shapes = (("q", 12, 10),)

    def federation(seed, bad=(0,)):
        clients, global_ = adapters(seed, shapes=shapes, bad=bad)
        if kw.get("shared_space") != "row":
            return clients, global_

        # Clients sharing a row space: the transposed federation.
        def swap(f):
            return cj.LoRAFactors(jnp.swapaxes(f.A, -1, -2), jnp.swapaxes(f.B, -1, -2))

        return ({k: swap(f) for k, f in clients.items()}, {k: swap(f) for k, f in global_.items()})

    clients, global_ = federation(7)
    w = jnp.arange(1.0, 9.0)
    extra = {}
    if kw.get("measure") == "update":
        extra["start"] = federation(17, bad=())[0]
    dense = call(
        cj.clair_aggregator(**kw, server_math="dense", tol=1e-10), clients, global_, w, **extra
    )
    fac = call(cj.clair_aggregator(**kw, tol=1e-10), clients, global_, w, **extra)
    np.testing.assert_array_equal(fac.flagged, dense.flagged)
    assert np.asarray(dense.flagged)[0]  # the contaminated client
    for name in clients:
        np.testing.assert_allclose(
            products(fac.clients[name]), products(dense.clients[name]), atol=1e-10
        )
        np.testing.assert_allclose(
            products(fac.global_[name]), products(dense.global_[name]), atol=1e-10
        )
        for key in ("aggregation_error", "scores", "threshold", "rank"):
            np.testing.assert_allclose(
                fac.diagnostics[f"{key}/{name}"], dense.diagnostics[f"{key}/{name}"], rtol=1e-9
            )


def test_clair_aggregator_rejects_an_unknown_server_math():
    with pytest.raises(ValueError, match="server_math"):
        cj.clair_aggregator(server_math="sparse")


@pytest.mark.slow
def test_clair_aggregator_maps_modules_of_one_shape_like_one_by_one(x64):
    """Modules of one shape share one compiled solve (``jax.lax.map``): every module's
    diagnostics and adapters equal those of the rule run on that module alone."""
    shapes = (("a", 16, 12), ("b", 16, 12), ("c", 12, 16), ("d", 16, 12))
    clients, global_ = adapters(11, shapes=shapes)
    w = jnp.arange(1.0, 9.0)
    rule = cj.clair_aggregator()
    together = call(rule, clients, global_, w)
    assert np.asarray(together.flagged)[0]
    for name in clients:
        alone = call(rule, {name: clients[name]}, {name: global_[name]}, w)
        for key, value in alone.diagnostics.items():
            if key.startswith("screened/"):  # the screening's statistics are over all modules
                continue
            np.testing.assert_allclose(together.diagnostics[key], value, rtol=1e-9, err_msg=key)
        np.testing.assert_allclose(
            products(together.global_[name]), products(alone.global_[name]), atol=1e-10
        )
        keep = ~np.asarray(together.flagged)  # flagged anywhere: keeps its own adapter
        np.testing.assert_allclose(
            products(together.clients[name])[keep], products(alone.clients[name])[keep], atol=1e-9
        )


@pytest.mark.parametrize("n,p,q,r", [(5, 30, 20, 3), (3, 4, 5, 2), (6, 8, 40, 3)])
def test_product_error_factored_equals_the_dense_norm(x64, n, p, q, r):
    """``||Σ p_i B_i A_i - B_g A_g||_F`` from the R factors alone, against NumPy on the
    products, with tall and wide stacked factors (``(n+1) r`` above and below ``p``, ``q``)."""
    rng = np.random.default_rng(n * p + q)
    b, a = rng.normal(size=(n, p, r)), rng.normal(size=(n, r, q))
    b_g, a_g = rng.normal(size=(p, r)), rng.normal(size=(r, q))
    w = rng.random(n)
    dense = np.einsum("i,ipr,irq->pq", w, b, a) - b_g @ a_g
    got = fag.product_error_factored(
        cj.LoRAFactors(B=jnp.asarray(b), A=jnp.asarray(a)),
        jnp.asarray(w),
        cj.LoRAFactors(B=jnp.asarray(b_g), A=jnp.asarray(a_g)),
    )
    np.testing.assert_allclose(float(got), np.linalg.norm(dense), rtol=1e-12)
