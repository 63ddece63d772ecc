"""clair_jax.simulate: the models and contamination kinds behave as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax import simulate

SIZES = {"n": 12, "p": 10, "q": 3, "rank": 2}
KIND = {name: i for i, name in enumerate(simulate.KIND_NAMES)}


def updates(seed=0, **kw):
    return simulate.shared_subspace_updates(jax.random.key(seed), **{**SIZES, **kw})


def off_subspace(basis, x):
    u = np.asarray(basis, np.float64)
    x = np.asarray(x, np.float64)
    return x - np.einsum("pr,rs,nsq->npq", u, u.T, x)


def test_benign_updates_share_the_column_space():
    fed = updates(fraction=0.25, offset_scale=2.0)
    u = np.asarray(fed.basis)
    np.testing.assert_allclose(u.T @ u, np.eye(2), atol=1e-5)
    benign = ~np.asarray(fed.contaminated)
    centred = np.asarray(fed.updates)[benign] - np.asarray(fed.offset)[None]
    assert np.abs(off_subspace(u, centred)).max() < 1e-5  # X_i - W_0 in span(U)
    # ... and together they span all of it (rank exactly 2).
    sv = np.linalg.svd(np.asarray(cj.blocks_to_matrix(jnp.asarray(centred))), compute_uv=False)
    assert sv[1] > 1.0 and sv[2] < 1e-5
    # Columns of W_0 have norm about offset_scale.
    assert 1.0 < np.linalg.norm(np.asarray(fed.offset), axis=0).mean() < 3.0
    # No noise: benign clients send their model exactly.
    np.testing.assert_array_equal(
        np.asarray(fed.updates)[benign], np.asarray(fed.parameters)[benign]
    )


def test_contaminated_count_positions_and_kind_cycle():
    fed = updates(n=20, fraction=0.3, kind=("dense", "sign_flip", "subspace"))
    kind = np.asarray(fed.kind)
    assert np.asarray(fed.contaminated).sum() == 6
    np.testing.assert_array_equal(fed.contaminated, kind > 0)
    assert sorted(np.bincount(kind, minlength=len(KIND))[[1, 2, 4]]) == [2, 2, 2]
    other = updates(seed=1, n=20, fraction=0.3)
    assert not np.array_equal(np.asarray(fed.contaminated), np.asarray(other.contaminated))
    assert int(updates(n=20, fraction=0.0).contaminated.sum()) == 0


def test_update_kinds_behave_as_documented():
    n = 40
    base = {"n": n, "fraction": 0.5, "offset_scale": 1.0}
    fed = updates(seed=3, kind="dense", **base)
    c = np.asarray(fed.contaminated)
    x, w0 = np.asarray(fed.updates), np.asarray(fed.offset)
    # dense: no shared structure, size of a benign update (spread sqrt(r q) = sqrt(6))
    norms = np.linalg.norm(x[c] - w0, axis=(1, 2))
    assert 0.7 * np.sqrt(6) < norms.mean() < 1.3 * np.sqrt(6)
    assert np.linalg.norm(off_subspace(fed.basis, x[c] - w0), axis=(1, 2)).mean() > 1.0
    # Its size does not follow the benign spread, only dense_scale.
    small = updates(seed=3, kind="dense", spread=0.1, dense_scale=2.0, **base)
    norms = np.linalg.norm((np.asarray(small.updates) - np.asarray(small.offset))[c], axis=(1, 2))
    assert 0.7 * 2 * np.sqrt(6) < norms.mean() < 1.3 * 2 * np.sqrt(6)

    noisy = {"noise": 0.1, **base}
    flip = updates(seed=3, kind="sign_flip", **noisy)
    honest = updates(seed=3, kind="sign_flip", n=n, fraction=0.0, noise=0.1, offset_scale=1.0)
    c = np.asarray(flip.contaminated)
    w0 = np.asarray(flip.offset)[None]
    x_h, x_f = np.asarray(honest.updates), np.asarray(flip.updates)
    # Same model and noise draws: the flipped clients send W_0 - (X_i - W_0).
    np.testing.assert_allclose(x_f[c], w0 - (x_h[c] - w0), atol=1e-5)
    np.testing.assert_allclose(x_f[~c], x_h[~c], atol=1e-6)

    scaled = updates(seed=3, kind="scaled", attack_scale=-3.0, **noisy)
    x_s = np.asarray(scaled.updates)
    np.testing.assert_allclose(x_s[c], w0 - 3.0 * (x_h[c] - w0), atol=1e-5)

    loud = updates(seed=3, kind="noise", noise_factor=4.0, **noisy)
    err = np.asarray(loud.updates - loud.parameters)
    np.testing.assert_allclose(err[c].std(), 0.4, rtol=0.1)
    np.testing.assert_allclose(err[~c].std(), 0.1, rtol=0.1)


def test_coordinated_group_shares_another_subspace():
    fed = updates(seed=4, n=30, fraction=0.5, kind="subspace")
    c = np.asarray(fed.contaminated)
    group = np.asarray(fed.updates)[c]
    sv = np.linalg.svd(np.asarray(cj.blocks_to_matrix(jnp.asarray(group))), compute_uv=False)
    assert sv[1] > 1.0 and sv[2] < 1e-5  # rank 2 together ...
    u2 = np.linalg.svd(np.asarray(cj.blocks_to_matrix(jnp.asarray(group))))[0][:, :2]
    assert float(cj.subspace_distance(fed.basis, u2)) > 1.0  # ... but not span(U)


def test_heterogeneity_is_off_subspace_with_the_given_scale():
    fed = updates(seed=5, n=200, heterogeneity=0.3)
    u = np.asarray(fed.basis)
    delta = off_subspace(u, np.asarray(fed.parameters))  # W_0 = 0 here
    # Entries of (I - U U^T) G have variance h^2 (p - r) / p.
    np.testing.assert_allclose(delta.std(), 0.3 * np.sqrt(8 / 10), rtol=0.05)
    inside = np.asarray(fed.parameters) - delta
    assert np.abs(off_subspace(u, inside)).max() < 1e-5


def test_regression_model_and_poisoning():
    kw = {"n": 8, "p": 5, "q": 2, "rank": 1, "samples": 30, "noise": 0.0, "fraction": 0.5}
    key = jax.random.key(6)
    clean = simulate.linear_regression(key, **{**kw, "fraction": 0.0})
    x, y = np.asarray(clean.features), np.asarray(clean.responses)
    np.testing.assert_allclose(y, np.einsum("nmp,npq->nmq", x, clean.parameters), atol=1e-5)

    shuffled = simulate.linear_regression(key, kind="label_noise", **kw)
    c = np.asarray(shuffled.contaminated)
    assert c.sum() == 4
    ys = np.asarray(shuffled.responses)
    np.testing.assert_allclose(ys[~c], y[~c])
    for i in np.flatnonzero(c):  # a permutation of the client's own responses
        np.testing.assert_allclose(np.sort(ys[i], axis=0), np.sort(y[i], axis=0))
        assert not np.allclose(ys[i], y[i])

    flip = simulate.linear_regression(key, kind="sign_flip", **kw)
    est = np.asarray(simulate.least_squares(flip.features, flip.responses))
    w0, theta = np.asarray(flip.offset), np.asarray(flip.parameters)
    np.testing.assert_allclose(est[c], 2 * w0 - theta[c], atol=1e-4)
    np.testing.assert_allclose(est[~c], theta[~c], atol=1e-4)

    dense = simulate.linear_regression(key, kind="dense", **kw)
    est = np.asarray(simulate.least_squares(dense.features, dense.responses))
    assert np.linalg.norm(off_subspace(dense.basis, est[c] - w0), axis=(1, 2)).min() > 0.1


def test_least_squares_matches_numpy(rng):
    x = rng.normal(size=(3, 12, 4))
    y = rng.normal(size=(3, 12, 2))
    est = np.asarray(simulate.least_squares(x, y))
    for i in range(3):
        np.testing.assert_allclose(est[i], np.linalg.lstsq(x[i], y[i], rcond=None)[0], atol=1e-5)
    ridge = np.asarray(simulate.least_squares(x, y, ridge=2.0))
    for i in range(3):
        ref = np.linalg.solve(x[i].T @ x[i] + 2.0 * np.eye(4), x[i].T @ y[i])
        np.testing.assert_allclose(ridge[i], ref, atol=1e-5)
    # Fewer samples than features: the minimum-norm solution, as numpy gives.
    wide = rng.normal(size=(2, 3, 5))
    est = np.asarray(simulate.least_squares(wide, y[:2, :3]))
    ref = np.linalg.lstsq(wide[0], y[0, :3], rcond=None)[0]
    np.testing.assert_allclose(est[0], ref, atol=1e-5)


def test_least_squares_error_scale():
    """The estimation error per entry is about noise / sqrt(m - p - 1)."""
    data = simulate.linear_regression(
        jax.random.key(7), n=30, p=16, q=4, rank=2, samples=48, noise=0.5
    )
    err = np.asarray(simulate.least_squares(data.features, data.responses) - data.parameters)
    np.testing.assert_allclose(err.std(), 0.5 / np.sqrt(48 - 16 - 1), rtol=0.1)


def test_deterministic_jittable_and_vmappable():
    a = updates(seed=9, fraction=0.25, noise=0.1)
    b = updates(seed=9, fraction=0.25, noise=0.1)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    keys = jax.vmap(jax.random.key)(jnp.arange(3))
    batch = jax.vmap(
        lambda k, s: simulate.shared_subspace_updates(k, **SIZES, fraction=0.25, noise=s)
    )(keys, jnp.array([0.1, 0.1, 0.2]))
    assert batch.updates.shape == (3, 12, 10, 3)
    single = simulate.shared_subspace_updates(keys[1], **SIZES, fraction=0.25, noise=0.1)
    np.testing.assert_allclose(batch.updates[1], single.updates, atol=1e-6)
    with jax.enable_x64(True):
        assert updates(dtype=jnp.float64).updates.dtype == jnp.float64


@pytest.mark.parametrize(
    "fn,kwargs,error,match",
    [
        ("updates", {"fraction": 1.0}, ValueError, r"fraction must be in \[0, 1\)"),
        ("updates", {"rank": 11}, ValueError, "rank must be <= p"),
        ("updates", {"kind": "label_noise"}, ValueError, "kind must be one of"),
        ("updates", {"kind": ()}, ValueError, "at least one"),
        ("updates", {"noise": -1.0}, ValueError, "noise must be finite and non-negative"),
        ("updates", {"n": 0}, ValueError, "n must be >= 1"),
        ("updates", {"n": 4, "fraction": 0.9}, ValueError, "n=4 rounds to 4 .* no benign"),
        ("regression", {"fraction": 0.9}, ValueError, "leaving no benign client"),
        ("regression", {"kind": "noise"}, ValueError, "kind must be one of"),
        ("regression", {"samples": 0}, ValueError, "samples must be >= 1"),
    ],
)
def test_bad_input(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        if fn == "updates":
            updates(**kwargs)
        else:
            simulate.linear_regression(
                jax.random.key(0), **{"n": 4, "p": 3, "q": 2, "rank": 1, "samples": 6, **kwargs}
            )


def test_least_squares_bad_input():
    with pytest.raises(ValueError, match=r"shapes \(n, m, p\) and \(n, m, q\)"):
        simulate.least_squares(np.ones((2, 5, 3)), np.ones((2, 4, 1)))
    with pytest.raises(ValueError, match="ridge must be finite and non-negative"):
        simulate.least_squares(np.ones((2, 5, 3)), np.ones((2, 5, 1)), ridge=-1.0)


def test_half_precision_federation():
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(0), n=6, p=8, q=3, rank=2, fraction=0.3, dtype=jnp.float16
    )
    assert fed.updates.dtype == fed.basis.dtype == jnp.float16
    gram = np.asarray(fed.basis, np.float32).T @ np.asarray(fed.basis, np.float32)
    np.testing.assert_allclose(gram, np.eye(2), atol=1e-2)


@pytest.mark.slow
def test_vmap_over_keys_returns_and_equals_single_draws(tmp_path, run_python):
    """jax.vmap over PRNG keys of shared_subspace_updates: its two independent QRs
    (the shared basis and the coordinated group's) were batched LAPACK calls, and
    50 trips of a 16-key vmap in a fori_loop hung at 0% CPU in 3 of 3 runs on
    2 cores (clair_jax._src.linalg.batching). Subprocess with a time limit; one trip's
    draws equal single draws."""
    out = tmp_path / "draws.npz"
    run_python(
        f"""
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        import clair_jax as cj
        keys = jax.random.split(jax.random.key(0), 16)
        def one(k):
            kw = dict(n=4, p=256, q=8, rank=16, fraction=0.25)
            return cj.simulate.shared_subspace_updates(k, **kw).updates
        def trip(i, acc):
            ks = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
            return acc + jax.vmap(one)(ks).sum()
        jax.block_until_ready(jax.jit(lambda: jax.lax.fori_loop(0, 50, trip, 0.0))())
        np.savez({str(out)!r}, draws=jax.jit(jax.vmap(one))(keys[:3]))
        """,
        timeout=300,
    )
    draws = np.load(out)["draws"]
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 16)
        for i in range(3):
            single = simulate.shared_subspace_updates(
                keys[i], n=4, p=256, q=8, rank=16, fraction=0.25
            ).updates
            np.testing.assert_allclose(draws[i], single, atol=1e-12)
