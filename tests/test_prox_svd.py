"""Proximal maps and the SVT backends against NumPy closed forms."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import clair_jax as cj
from clair_jax._src.linalg import batching, prox, svd, svt_capped
from clair_jax._src.linalg import svt as svt_lib


def numpy_svt(m, tau):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u * np.maximum(s - tau, 0)) @ vt


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
@pytest.mark.parametrize("rank", [0, 3])
def test_capped_svt_certificate_against_numpy(x64, rng, shape, rank):
    """capped_svt_certified(z, tau, V, r, L, margin, bound) holds for the exact SVT with
    z's own top-r right singular vectors exactly when sigma_{r+1}(z) < tau + margin; it
    fails for an L off by more than the bound, and for a basis holding a mix of the
    (r+1)-th and (r+2)-th directions (the rank-capped near-tie) or a kept direction not
    converged (the mix of the r-th and (r+1)-th)."""
    k = 5
    spectrum = np.array([9.0, 7.0, 5.0, 2.0, 1.9, 1.0, 0.5, 0.2])
    u = np.linalg.qr(rng.normal(size=(shape[0], 8)))[0]
    v = np.linalg.qr(rng.normal(size=(shape[1], 8)))[0]
    z = jnp.asarray((u * spectrum) @ v.T)
    nxt = spectrum[rank]
    basis = jnp.asarray(np.concatenate([v[:, :rank], v[:, rank + 2 : rank + 2 + k - rank]], 1))

    def certified(tau, margin, low_rank=None, bound=1e-9, basis=basis, rank=rank):
        low_rank = numpy_svt(np.asarray(z), tau) if low_rank is None else low_rank
        return bool(svt_capped.capped_svt_certified(z, tau, basis, rank, low_rank, margin, bound))

    for tau, margin in [(nxt + 0.01, 0.0), (nxt - 0.01, 0.0), (nxt - 0.01, 0.02), (0.0, 0.0)]:
        # What the capped map keeps: the first `rank` directions, shrunk.
        capped = (u[:, :rank] * (spectrum[:rank] - tau)) @ v[:, :rank].T
        assert certified(tau, margin, capped) == (nxt < tau + margin), (tau, margin)
    tau = nxt + 0.01
    exact = numpy_svt(np.asarray(z), tau)
    wrong = exact + 1e-3 * np.outer(u[:, 0], v[:, 0])
    if rank > 0:
        assert not certified(tau, 0.0, wrong, bound=1e-4)
        assert certified(tau, 0.0, wrong, bound=2e-3)
    # The near-tie: the basis holds (v_{r+1} + v_{r+2}) / sqrt(2) as its (r+1)-th column,
    # whose Rayleigh quotient is below the threshold.
    mixed = (v[:, rank] + v[:, rank + 1]) / np.sqrt(2)
    tied = jnp.asarray(np.concatenate([v[:, :rank], mixed[:, None], v[:, rank + 2 :]], 1)[:, :k])
    tau = 0.5 * (nxt + np.sqrt((nxt**2 + spectrum[rank + 1] ** 2) / 2))
    assert np.linalg.norm(z @ tied[:, rank]) < tau < nxt
    assert not certified(tau, 0.0, basis=tied)
    if rank > 0:
        # A kept direction not converged: the r-th column mixes v_r and v_{r+1} a little.
        turned = v[:, rank - 1] * np.cos(1e-3) + v[:, rank] * np.sin(1e-3)
        unsettled = np.concatenate([v[:, : rank - 1], turned[:, None], v[:, rank + 2 :]], 1)
        unsettled = jnp.asarray(unsettled[:, :k])
        tau = nxt + 0.01
        zv = np.asarray(z) @ np.asarray(unsettled[:, :rank])
        uu, ss, oo = np.linalg.svd(zv, full_matrices=False)
        capped = (uu * np.maximum(ss - tau, 0)) @ oo @ np.asarray(unsettled[:, :rank]).T
        assert np.linalg.norm(capped - exact) > 1e-4
        assert not certified(tau, 0.0, capped, bound=1e-4, basis=unsettled)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (20, 20)])
@pytest.mark.parametrize("backend", ["full", "gram"])
def test_svt_matches_numpy(x64, rng, shape, backend):
    m = rng.normal(size=shape)
    tau = 0.5 * np.linalg.svd(m, compute_uv=False)[3]
    out, rank, _ = cj.singular_value_threshold(jnp.asarray(m), tau, backend=backend)
    np.testing.assert_allclose(out, numpy_svt(m, tau), atol=1e-10)
    assert int(rank) == int(np.sum(np.linalg.svd(m, compute_uv=False) > tau))


def test_rank_capped_converges_to_exact_svt(x64, rng):
    u = np.linalg.qr(rng.normal(size=(30, 3)))[0]
    m = u @ np.diag([10.0, 5.0, 2.0]) @ rng.normal(size=(3, 50)) + 1e-3 * rng.normal(size=(30, 50))
    basis = svt_capped.initial_basis(m.shape, 6, jnp.float64)
    for _ in range(30):  # repeated calls = subspace iteration, as inside the solvers
        out, rank, basis = cj.singular_value_threshold(
            jnp.asarray(m), 0.1, backend="rank_capped", basis=basis
        )
    np.testing.assert_allclose(out, numpy_svt(m, 0.1), atol=1e-9)
    assert int(rank) == 3


@pytest.mark.parametrize("shape", [(40, 120), (120, 40), (30, 30)])
@pytest.mark.parametrize("rank", [None, 2, 0])  # generic, exactly rank 2 < cap, zero
def test_one_rank_capped_step_is_the_svt_of_the_projection(x64, rng, shape, rank):
    """One capped step: ``q SVT_tau(q^T z)`` with ``q`` an orthonormal basis of ``z V_0``.

    The NumPy reference takes LAPACK's SVD of the ``k x m`` projection; the library
    goes through the QR of ``z^T q`` and a ``k x k`` SVD. The new basis spans the
    projection's row space.
    """
    cap = 6
    z = rng.normal(size=shape)
    if rank is not None:
        z = rng.normal(size=(shape[0], max(rank, 1))) @ rng.normal(size=(max(rank, 1), shape[1]))
        z *= rank > 0
    basis = np.asarray(svt_capped.initial_basis(shape, cap, jnp.float64))
    q = np.linalg.qr(z @ basis)[0]
    proj = q.T @ z
    s_proj = np.linalg.svd(proj, compute_uv=False)
    tau = 0.3 * s_proj[1] if rank != 0 else 0.1
    out, n_kept, new_basis = cj.singular_value_threshold(
        jnp.asarray(z), tau, backend="rank_capped", basis=jnp.asarray(basis)
    )
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(new_basis))
    np.testing.assert_allclose(out, q @ numpy_svt(proj, tau), rtol=1e-12, atol=1e-12)
    assert int(n_kept) == int(np.sum(s_proj > tau))
    new_basis = np.asarray(new_basis)
    np.testing.assert_allclose(new_basis.T @ new_basis, np.eye(cap), rtol=0, atol=1e-12)
    if rank != 0:  # the row space of the projection lies in the new basis' span
        np.testing.assert_allclose(proj @ new_basis @ new_basis.T, proj, rtol=0, atol=1e-10)


def test_block_soft_threshold_closed_form(x64, rng):
    z = rng.normal(size=(5, 3, 2))
    tau = np.array([0.0, 0.5, 1.0, 2.0, 100.0])
    norms = np.linalg.norm(z, axis=(1, 2))
    expected = z * np.maximum(0.0, 1 - tau / norms)[:, None, None]
    np.testing.assert_allclose(cj.block_soft_threshold(jnp.asarray(z), tau), expected, atol=1e-14)


def test_block_soft_threshold_is_the_prox(x64, rng):
    """The output minimises tau ||S||_F + 1/2 ||S - Z||^2: no perturbation does better."""
    z, tau = rng.normal(size=(1, 4, 3)), 0.7
    s = np.asarray(cj.block_soft_threshold(jnp.asarray(z), tau))

    def f(v):
        return tau * np.linalg.norm(v) + 0.5 * np.sum((v - z) ** 2)

    for _ in range(200):
        assert f(s) <= f(s + 1e-3 * rng.normal(size=s.shape)) + 1e-12


def test_block_norm_gradient_at_zero_is_finite():
    g = jax.grad(lambda x: jnp.sum(prox.block_soft_threshold(x, 1.0) ** 2))(jnp.zeros((2, 3, 3)))
    assert bool(jnp.all(jnp.isfinite(g)))


def test_layout_round_trip(rng):
    x = jnp.asarray(rng.normal(size=(4, 3, 2)))
    m = cj.blocks_to_matrix(x)
    assert m.shape == (3, 8)
    np.testing.assert_array_equal(m[:, 2:4], x[1])
    np.testing.assert_array_equal(cj.matrix_to_blocks(m, 4), x)


@pytest.mark.parametrize(
    ("shape", "expected"), [((256, 512), "gram"), ((100, 120), "full"), ((512, 64), "gram")]
)
def test_auto_backend_by_shape_and_dtype(shape, expected):
    assert svt_lib.select_backend(shape, dtype=jnp.float64) == expected
    assert svt_lib.select_backend(shape, dtype=jnp.float32) == "full"
    assert svt_lib.select_backend(shape, rank_cap=5) == "rank_capped"


def test_auto_rank_cap_only_for_large_matrices_and_auto():
    cap = svt_lib.auto_rank_cap((128, 4096))
    assert cap == (None if jax.default_backend() == "tpu" else svt_lib.AUTO_RANK_CAP)
    assert svt_lib.auto_rank_cap((127, 4096)) is None
    assert svt_lib.auto_rank_cap((256, 512), "full") is None
    if cap is not None:  # off TPU
        assert svt_lib.resolve_backend((128, 4096)) == ("rank_capped", cap)
        assert svt_lib.resolve_backend((128, 4096), unrolled=True) == ("full", None)
    assert svt_lib.resolve_backend((256, 512), "gram") == ("gram", None)


def test_backend_errors():
    with pytest.raises(ValueError, match="svd must be one of"):
        svt_lib.select_backend((4, 4), "lapack")
    with pytest.raises(ValueError, match="needs rank_cap"):
        svt_lib.select_backend((4, 4), "rank_capped")
    with pytest.raises(ValueError, match="rank_cap must be an int in"):
        svt_lib.select_backend((4, 6), "rank_capped", rank_cap=7)


@pytest.mark.parametrize("backend", ["full", "gram"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_svt_closed_form_derivative_matches_finite_differences(x64, rng, shape, tau, backend):
    z = jnp.asarray(rng.normal(size=shape))
    svt = lambda z, t: svt_lib.svt(z, t, backend=backend)[0]  # noqa: E731
    jax.test_util.check_grads(svt, (z, tau), order=1, modes=["fwd", "rev"], eps=1e-6)


@pytest.mark.parametrize("backend", ["full", "gram"])
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_svt_derivative_is_finite_at_repeated_singular_values(x64, tau, backend):
    # Zero and rank-one matrices: autodiff through the SVD divides by s_i^2 - s_j^2 = 0.
    # Near a rank-one matrix with s > tau, SVT(z + t dz) - SVT(z) is smooth in t: the
    # closed form must match central differences there.
    rank_one = jnp.outer(jnp.arange(1.0, 7.0), jnp.ones(9))
    dz = jnp.asarray(np.random.default_rng(3).normal(size=(6, 9)))
    svt = lambda z: svt_lib.svt(z, tau, backend=backend)[0]  # noqa: E731
    for z in (jnp.zeros((6, 9)), rank_one):
        _, tangent = jax.jvp(svt, (z,), (dz,))
        grad = jax.grad(lambda z: jnp.sum(svt(z) ** 2))(z)
        assert bool(jnp.all(jnp.isfinite(tangent))) and bool(jnp.all(jnp.isfinite(grad)))
    eps = 1e-6
    central = (svt(rank_one + eps * dz) - svt(rank_one - eps * dz)) / (2 * eps)
    np.testing.assert_allclose(jax.jvp(svt, (rank_one,), (dz,))[1], central, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 4), pytest.param((4, 12), marks=pytest.mark.slow), (12, 4)])
def test_thin_svd_matches_numpy_and_batches_like_a_loop(shape):
    """thin_svd (QR first for wide and tall matrices) against NumPy's SVD, and its
    own batching rule (one matrix at a time on CPU: jaxlib 0.10's batched QR/SVD
    kernels deadlocked jax.vmap(cj.clair)) against a loop, nested vmaps too."""
    z = jax.random.normal(jax.random.key(0), (2, 3, *shape))
    u, s, vt = svd.thin_svd(z[0, 0])
    np.testing.assert_allclose(s, np.linalg.svd(np.asarray(z[0, 0]), compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose((u * s[None]) @ vt, z[0, 0], atol=1e-5)
    np.testing.assert_allclose(u.T @ u, np.eye(len(s)), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(len(s)), atol=1e-5)
    for compute_uv in (True, False):
        fn = partial(svd.thin_svd, compute_uv=compute_uv)
        batched = jax.jit(jax.vmap(jax.vmap(fn)))(z)
        for i in range(2):
            for j in range(3):
                chex.assert_trees_all_close(
                    jax.tree.map(lambda a, i=i, j=j: a[i, j], batched), fn(z[i, j]), atol=1e-6
                )


def test_sequential_on_cpu_batches_like_vmap_with_unbatched_arguments_and_nesting():
    """The rule maps one problem at a time (CPU) or vmaps: unbatched arguments are
    broadcast, pytree outputs keep their structure, nested vmaps map again."""

    def fn(z, w):
        q = jnp.linalg.qr(z @ w)[0]
        return {"q": q, "norm": jnp.sum(q * q)}

    wrapped = batching.sequential_on_cpu(fn)
    z = jax.random.normal(jax.random.key(0), (2, 3, 6, 5))
    w = jax.random.normal(jax.random.key(1), (5, 2))
    chex.assert_trees_all_close(wrapped(z[0, 0], w), fn(z[0, 0], w))
    nested = jax.jit(jax.vmap(jax.vmap(wrapped, in_axes=(0, None)), in_axes=(0, None)))(z, w)
    for i in range(2):
        for j in range(3):
            chex.assert_trees_all_close(
                jax.tree.map(lambda a, i=i, j=j: a[i, j], nested), fn(z[i, j], w), atol=1e-6
            )
    both = jax.vmap(wrapped)(z[0], jnp.stack([w, 2 * w, 3 * w]))
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[2], both), fn(z[0, 2], 3 * w), atol=1e-6)


@pytest.mark.parametrize(
    "backend",
    [
        "rank_capped",
        pytest.param("gram", marks=pytest.mark.slow),
        pytest.param("full", marks=pytest.mark.slow),
    ],
)
def test_concurrent_vmapped_svts_return_and_equal_a_loop(backend, tmp_path, run_python):
    """Two independent vmapped SVTs (16 problems each) per trip of a fori_loop.

    jaxlib 0.10's CPU QR kernel spreads a batch over XLA:CPU's thread pool and
    blocks until it is done; two at once on a two-thread pool wait for each other
    forever. The rank-capped backend's QRs were batched under vmap and hung at
    0% CPU in 5 of 5 runs (2 cores) before they went through
    batching.sequential_on_cpu. Run in a subprocess with a time limit, so that a
    hang fails the test; one trip's batch equals a loop of single SVTs.
    """
    out = tmp_path / "svt.npz"
    run_python(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import clair_jax as cj
        z = jax.random.normal(jax.random.key(0), (2, 16, 64, 256))
        basis = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (256, 16)))[0]
        kw = dict(backend={backend!r})
        if {backend!r} == "rank_capped":
            kw["basis"] = basis
        svt = jax.vmap(lambda m: cj.singular_value_threshold(m, 1.0, **kw)[0])
        def trip(i, c):
            return c[0] + 1e-3 * svt(c[0]), c[1] + 1e-3 * svt(c[1])
        run = jax.jit(lambda a, c: jax.lax.fori_loop(0, 100, trip, (a, c)))
        jax.block_until_ready(run(z[0], z[1]))
        np.savez({str(out)!r}, z=z[0], once=jax.jit(svt)(z[0]), basis=basis)
        """,
        timeout=300,
    )
    saved = np.load(out)
    with jax.enable_x64(True):
        kw = {"backend": backend}
        if backend == "rank_capped":
            kw["basis"] = jnp.asarray(saved["basis"])
        for m, once in zip(saved["z"], saved["once"], strict=True):
            alone = cj.singular_value_threshold(jnp.asarray(m), 1.0, **kw)[0]
            np.testing.assert_allclose(once, alone, atol=1e-10)


def test_nuclear_norm_value_gradient_and_vmap_against_numpy(x64, rng):
    """``prox.nuclear_norm`` (thin SVD, own JVP): NumPy's value, ``U V^T`` as gradient
    (finite differences agree), the same under ``jax.vmap``."""
    x = jnp.asarray(rng.standard_normal((3, 5, 4)))
    m = np.concatenate(list(np.asarray(x)), axis=1)
    np.testing.assert_allclose(prox.nuclear_norm(x), np.linalg.svd(m, compute_uv=False).sum())
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    grad = np.asarray(prox.blocks_to_matrix(jax.grad(prox.nuclear_norm)(x)))
    np.testing.assert_allclose(grad, u @ vt, atol=1e-12)
    jax.test_util.check_grads(prox.nuclear_norm, (x,), order=1, modes=("fwd", "rev"))
    batch = jnp.stack([x, -2.0 * x])
    np.testing.assert_allclose(
        jax.vmap(prox.nuclear_norm)(batch), [prox.nuclear_norm(x), 2 * prox.nuclear_norm(x)]
    )
