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
        (X, {"constrained": True}, ValueError, 'constrained=True is solved by method="admm"'),
        (X, {"init": (np.zeros((4, 5, 2)), np.zeros((4, 5)))}, ValueError, "init sparse must"),
        (X, {"init": np.zeros((4, 5, 2))}, TypeError, "init must be"),
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
