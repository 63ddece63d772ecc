"""Bad input gets a clear error naming the argument and the shapes, never a silent NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj

X = np.random.default_rng(0).normal(size=(4, 5, 2))
OK = {"lam_nuc": 1.0, "lam_block": 1.0}


@pytest.mark.parametrize(
    "updates,kwargs,error,match",
    [
        (X[0], {}, ValueError, r"updates must have shape \(n, p, q\).*got shape \(5, 2\)"),
        (
            X[None],
            {},
            ValueError,
            r"got shape \(1, 4, 5, 2\); batch several problems with jax.vmap",
        ),
        (np.zeros((0, 5, 2)), {}, ValueError, "non-empty"),
        ("abc", {}, TypeError, "updates must be an array of real numbers"),
        (X + 1j, {}, TypeError, "updates must be real"),
        (np.where(X > 1, np.nan, X), {}, ValueError, "updates contains NaN or inf"),
        (np.where(X > 1, np.inf, X), {}, ValueError, "updates contains NaN or inf"),
        (X, {"lam_nuc": -1.0}, ValueError, "lam_nuc must be finite and non-negative"),
        (X, {"lam_block": np.nan}, ValueError, "lam_block must be finite and non-negative"),
        (X, {"lam_nuc": np.inf}, ValueError, "lam_nuc must be finite and non-negative"),
        (X, {"lam_nuc": np.ones(3)}, ValueError, r"lam_nuc must be a scalar, got shape \(3,\)"),
        (
            X,
            {"weights": np.ones(3)},
            ValueError,
            r"weights must have shape \(n,\) = \(4,\).*\(3,\)",
        ),
        (X, {"weights": -np.ones(4)}, ValueError, "weights must be finite and non-negative"),
        (X, {"tol": 0.0}, ValueError, "tol must be finite and > 0"),
        (X, {"tol": -1e-6}, ValueError, "tol must be finite and > 0"),
        (X, {"tol": "small"}, TypeError, "tol must be a real number"),
        (X, {"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        (X, {"max_iter": 2.5}, TypeError, "max_iter must be an int"),
        (X, {"method": "sgd"}, ValueError, "method must be one of"),
        (X, {"svd": "lapack"}, ValueError, "svd must be one of"),
        (X, {"svd": "rank_capped"}, ValueError, "needs rank_cap"),
        (X, {"rank_cap": 100}, ValueError, r"rank_cap must be an int in \[1, 5\]"),
        (X, {"diff": "forward"}, ValueError, "diff must be one of"),
        (
            X,
            {"constrained": True, "method": "fista"},
            ValueError,
            'constrained=True is solved by method="admm"',
        ),
        (X, {"init": (np.zeros((4, 5, 2)), np.zeros((4, 5)))}, ValueError, "init sparse must"),
        (X, {"init": np.zeros((4, 5, 2))}, TypeError, "init must be"),
        (X, {"init": (np.full_like(X, np.nan), 0 * X)}, ValueError, "init low_rank contains NaN"),
        (X, {"rank_cap": np.int64(2), "svd": "lapack"}, ValueError, "svd must be one of"),
        (X, {"rank_cap": True}, TypeError, "rank_cap must be an int"),
        (X, {"offset": "no"}, TypeError, "offset must be a bool, got str 'no'"),
        (X, {"constrained": 1}, TypeError, "constrained must be a bool"),
    ],
)
def test_bad_input_is_rejected(updates, kwargs, error, match):
    with pytest.raises(error, match=match):
        cj.decompose(updates, **{**OK, **kwargs})


def test_traced_bad_values_raise_at_run_time():
    solve = jax.jit(lambda x, lam: cj.decompose(x, lam_nuc=lam, lam_block=1.0).low_rank)
    assert bool(jnp.all(jnp.isfinite(solve(X, 1.0))))
    with pytest.raises(Exception, match="lam_nuc must be finite and non-negative"):
        jax.block_until_ready(solve(X, -1.0))
    with pytest.raises(Exception, match="updates contains NaN or inf"):
        jax.block_until_ready(solve(np.where(X > 1, np.nan, X), 1.0))


def test_traced_tol_is_a_type_error():
    with pytest.raises(TypeError, match="tol must be a static Python number"):
        jax.jit(lambda t: cj.decompose(X, tol=t, **OK))(1e-6)


def test_integer_updates_are_promoted_to_float():
    sol = cj.decompose(np.arange(40).reshape(4, 5, 2), **OK)
    assert jnp.issubdtype(sol.low_rank.dtype, jnp.floating)


def test_numpy_integer_rank_cap_is_accepted():
    sol = cj.decompose(X, rank_cap=np.int64(2), **OK)
    ref = cj.decompose(X, rank_cap=2, **OK)
    np.testing.assert_array_equal(sol.low_rank, ref.low_rank)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: cj.singular_value_threshold(jnp.eye(3), -1.0), ValueError, "tau must be finite"),
        (
            lambda: cj.singular_value_threshold(jnp.ones(3), 1.0),
            ValueError,
            r"z must have shape \(p, m\), got shape \(3,\)",
        ),
        (lambda: cj.singular_value_threshold([[1.0]], jnp.ones(2)), ValueError, "tau must be a sc"),
        (lambda: cj.singular_value_threshold(jnp.eye(3), 1.0, backend="x"), ValueError, "backend"),
        (
            lambda: cj.singular_value_threshold(
                jnp.eye(3), 1.0, backend="rank_capped", basis=jnp.ones((2, 1))
            ),
            ValueError,
            r"basis must have shape \(cols, rank_cap\) = \(3, k\)",
        ),
        (lambda: cj.block_soft_threshold(jnp.ones((2, 1, 1)), -2.0), ValueError, "tau must be fin"),
        (lambda: cj.block_soft_threshold(jnp.ones((2, 1, 1)), jnp.ones(3)), ValueError, r"\(2,\)"),
        (lambda: cj.block_soft_threshold(jnp.ones((2, 1)), 1.0), ValueError, r"z must have shape"),
        (lambda: cj.blocks_to_matrix(jnp.ones((2, 2))), ValueError, r"x must have shape \(n, p, q"),
        (lambda: cj.matrix_to_blocks(jnp.ones((2, 7)), 3), ValueError, "n must be an int >= 1 di"),
        (lambda: cj.matrix_to_blocks(jnp.ones((2, 6)), 0), ValueError, "n must be an int >= 1 di"),
    ],
)
def test_bad_input_to_the_prox_maps(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_traced_negative_threshold_raises_at_run_time():
    svt = jax.jit(lambda t: cj.singular_value_threshold(jnp.eye(3), t)[0])
    svt(0.5)
    with pytest.raises(Exception, match="tau must be finite and non-negative"):
        jax.block_until_ready(svt(-1.0))


def test_prox_maps_of_integer_and_half_precision_input():
    # Integer blocks become floats before thresholding (a float tau was truncated).
    out = cj.block_soft_threshold(jnp.array([[[5]], [[1]]]), 2.5)
    np.testing.assert_array_equal(out[:, 0, 0], [2.5, 0.0])
    for dtype in (jnp.float16, jnp.bfloat16):
        out, rank, _ = cj.singular_value_threshold(jnp.diag(jnp.array([3.0, 1.0], dtype)), 2.0)
        assert out.dtype == jnp.float32 and int(rank) == 1
        np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 0.0]])
        sol = cj.decompose(X.astype(dtype), **OK)
        assert sol.low_rank.dtype == jnp.float32 and bool(sol.converged)
