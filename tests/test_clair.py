"""cj.clair: exact and stable recovery, detection, refinement against NumPy, transforms, errors."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax._src.clair import core, detection
from clair_jax._src.clair import noise as noise_lib

SMALL = {"n": 16, "p": 12, "q": 3, "rank": 2, "fraction": 0.25}


def small_federation(seed=0, noise=0.01, **kw):
    kw = {**SMALL, "noise": noise, **kw}
    return cj.simulate.shared_subspace_updates(jax.random.key(seed), **kw)


def projector(basis):
    b = np.asarray(basis, np.float64)
    return b @ b.T


# --- exact recovery (noiseless) and stable recovery (noisy) ------------------------------


@pytest.mark.parametrize("offset", [False, True])
def test_exact_recovery_noiseless_with_defaults(x64, offset):
    """30% arbitrary clients, no noise: subspace, contaminated set and benign models exact."""
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(3), n=30, p=40, q=3, rank=2, fraction=0.3, offset_scale=3.0 * offset
    )
    res = cj.clair(fed.updates, offset=offset)
    assert int(res.rank) == 2
    np.testing.assert_array_equal(res.collaborative, ~fed.contaminated)
    assert float(cj.subspace_distance(fed.basis, res.basis)) < 1e-9
    benign = ~np.asarray(fed.contaminated)
    np.testing.assert_allclose(
        np.asarray(res.refined)[benign], np.asarray(fed.parameters)[benign], atol=1e-9
    )
    # Zero padding beyond the estimated rank: P = Û Û^T is a rank-2 projector.
    np.testing.assert_array_equal(np.asarray(res.basis)[:, 2:], 0.0)


def _regression_errors(key, fraction, kind="dense"):
    data = cj.simulate.linear_regression(
        key, n=20, p=32, q=8, rank=2, samples=64, fraction=fraction, kind=kind
    )
    est = cj.simulate.least_squares(data.features, data.responses) - data.offset[None]
    theta = data.parameters - data.offset[None]
    res = cj.clair(est)
    benign = ~data.contaminated

    def mean_error(x):
        err = jnp.linalg.norm(x - theta, axis=(1, 2))
        return jnp.sum(jnp.where(benign, err, 0.0)) / jnp.sum(benign)

    return {
        "metrics": cj.detection_metrics(~res.collaborative, data.contaminated),
        "clair": mean_error(res.refined),
        "local": mean_error(est),
        "mean": mean_error(jnp.broadcast_to(jnp.mean(est, axis=0), est.shape)),
        "median": mean_error(jnp.broadcast_to(jnp.median(est, axis=0), est.shape)),
        "sigma_ratio": res.noise_scale * np.sqrt(64 - 32 - 1),
        "subspace": cj.subspace_distance(data.basis, res.basis),
        "rank": res.rank,
    }


def test_noisy_regression_detection_and_refinement():
    """20 clients, 30% dense contamination, twice as many samples as features (3 seeds)."""
    keys = jax.vmap(jax.random.key)(jnp.arange(100, 103))
    out = jax.vmap(partial(_regression_errors, fraction=0.3))(keys)
    np.testing.assert_array_equal(out["rank"], 2)
    np.testing.assert_array_equal(out["metrics"].f1, 1.0)
    # Refinement: well below local least squares and the (robust) global aggregates.
    ratio = np.asarray(out["clair"] / out["local"])
    assert np.all(ratio < 0.5), ratio
    assert np.all(out["clair"] < 0.5 * out["median"])
    assert np.all(out["clair"] < 0.5 * out["mean"])
    # σ̂ within 10% of the least-squares error per entry (noise / sqrt(m - p - 1)).
    np.testing.assert_allclose(out["sigma_ratio"], 1.0, rtol=0.1)
    assert np.all(np.asarray(out["subspace"]) < 0.5)


@pytest.mark.slow
def test_stable_recovery_error_grows_linearly_with_noise():
    """Subspace error / noise stays bounded (and small) across two decades of noise."""
    errors = []
    noises = [1e-3, 1e-2, 1e-1]
    for noise in noises:
        fed = small_federation(seed=4, noise=noise)
        res = cj.clair(fed.updates)
        assert int(res.rank) == 2
        np.testing.assert_array_equal(res.collaborative, ~fed.contaminated)
        errors.append(float(cj.subspace_distance(fed.basis, res.basis)))
    ratios = np.array(errors) / np.array(noises)
    assert ratios.max() < 3.0 * ratios.min(), ratios
    assert ratios.max() < 10.0


# --- refinement formula against NumPy -----------------------------------------------------


@pytest.mark.parametrize("contaminated", ["consensus", "refine", "local"])
def test_refinement_matches_numpy(contaminated):
    fed = small_federation(seed=1)
    res = cj.clair(fed.updates, contaminated=contaminated)
    x = np.asarray(fed.updates, np.float64)
    c = np.asarray(res.collaborative)
    assert 0 < c.sum() < len(c)
    consensus = x[c].mean(axis=0)
    proj = projector(res.basis)
    expected = consensus[None] + np.einsum("ab,nbq->naq", proj, x - consensus[None])
    if contaminated == "consensus":
        expected[~c] = consensus
    elif contaminated == "local":
        expected[~c] = x[~c]
    np.testing.assert_allclose(res.consensus, consensus, atol=1e-5)
    np.testing.assert_allclose(res.refined, expected, atol=1e-5)
    # Scores are the off-subspace residual norms (offset=False: no centring).
    scores = np.linalg.norm(x - np.einsum("ab,nbq->naq", proj, x), axis=(1, 2))
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(c, scores <= float(res.threshold))


def test_default_lambdas_follow_the_documented_rule():
    fed = small_federation(seed=2)
    n, p, q = fed.updates.shape
    res = cj.clair(fed.updates, noise_scale=0.01)
    np.testing.assert_allclose(res.lam_nuc, 2 * 0.01 * (np.sqrt(p) + np.sqrt(n * q)), rtol=1e-6)
    np.testing.assert_allclose(res.lam_block, 2 * 0.01 * np.sqrt(p * q), rtol=1e-6)
    # The decomposition is the one cj.decompose gives for those λ's (same solver).
    sol = cj.decompose(fed.updates, lam_nuc=res.lam_nuc, lam_block=res.lam_block, method="admm")
    np.testing.assert_allclose(res.decomposition.low_rank, sol.low_rank, atol=1e-5)
    np.testing.assert_allclose(res.block_norms, np.linalg.norm(sol.sparse, axis=(1, 2)), atol=1e-5)


@pytest.mark.slow
def test_given_lambdas_threshold_and_rank():
    fed = small_federation(seed=2)
    res = cj.clair(fed.updates, lam_nuc=0.5, lam_block=0.4, threshold=1e6, rank=3)
    assert float(res.lam_nuc) == 0.5 and float(res.lam_block) == pytest.approx(0.4)
    assert bool(res.collaborative.all())  # nothing above a huge threshold
    assert res.basis.shape == (12, 3) and int(res.rank) == 3
    np.testing.assert_allclose(res.basis.T @ res.basis, np.eye(3), atol=1e-5)
    flagged_all = cj.clair(fed.updates, threshold=0.0)
    assert not bool(flagged_all.collaborative.any())
    # Nobody collaborative: the consensus falls back to the plain mean.
    np.testing.assert_allclose(flagged_all.consensus, fed.updates.mean(axis=0), atol=1e-6)


@pytest.mark.slow
def test_max_rank_pads_the_basis():
    fed = small_federation(seed=2)
    res = cj.clair(fed.updates, max_rank=4)
    assert res.basis.shape == (12, 4) and int(res.rank) == 2
    np.testing.assert_array_equal(np.asarray(res.basis)[:, 2:], 0.0)
    full = cj.clair(fed.updates)
    assert full.basis.shape == (12, 12)
    np.testing.assert_allclose(projector(res.basis), projector(full.basis), atol=1e-5)


def test_offset_is_needed_and_handled():
    """A large unknown common offset: offset=True recovers what offset=False gets without it."""
    fed = small_federation(seed=5, offset_scale=10.0)
    centred = fed.updates - fed.offset[None]
    plain = cj.clair(centred)
    with_offset = cj.clair(fed.updates, offset=True)
    np.testing.assert_array_equal(with_offset.collaborative, plain.collaborative)
    np.testing.assert_array_equal(with_offset.collaborative, ~fed.contaminated)
    assert int(with_offset.rank) == 2
    assert float(cj.subspace_distance(with_offset.basis, plain.basis)) < 0.05
    benign = ~np.asarray(fed.contaminated)
    err = np.linalg.norm(np.asarray(with_offset.refined - fed.parameters), axis=(1, 2))
    local = np.linalg.norm(np.asarray(fed.updates - fed.parameters), axis=(1, 2))
    assert err[benign].mean() < 0.6 * local[benign].mean()
    # Without the offset option, the offset enters the "shared" part: rank goes up.
    ignored = cj.clair(fed.updates)
    assert int(ignored.rank) > 2


@pytest.mark.parametrize("offset", [False, True])
def test_default_solver_converges_on_exact_lora_products_in_float32(offset):
    """Rank-4 products ``B_i A_i`` of 8 clients, float32: the default (ADMM) decomposition
    converges at tol 1e-6 (FISTA's residual stalls near 1.5e-6 here, a float32 floor), and
    its objective matches a float64 FISTA solve of the same problem."""
    k_b, k_a = jax.random.split(jax.random.key(1))
    b = 0.01 * jax.random.normal(k_b, (8, 64, 4))
    a = jax.random.normal(k_a, (8, 4, 64)) / 8
    updates = jnp.einsum("npr,nrq->npq", b, a)
    res = cj.clair(updates, offset=offset)
    sol = res.decomposition
    assert bool(sol.converged) and int(sol.num_iters) < 2000
    assert sol.low_rank.dtype == jnp.float32
    with jax.enable_x64(True):
        ref = cj.decompose(
            np.asarray(updates, np.float64),
            lam_nuc=float(res.lam_nuc),
            lam_block=float(res.lam_block),
            offset=offset,
            method="fista",
            max_iter=5000,
        )
        assert bool(ref.converged)
        np.testing.assert_allclose(float(sol.objective), float(ref.objective), rtol=1e-5)


def test_marchenko_pastur_median_matches_quadrature():
    from scipy import integrate, optimize

    for beta in (1.0, 0.5, 0.1):
        a, b = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2

        def cdf(t, a=a, b=b, beta=beta):
            density = lambda x: np.sqrt((b - x) * (x - a)) / (2 * np.pi * beta * x)  # noqa: E731
            return integrate.quad(density, a, t, limit=200)[0]

        ref = optimize.brentq(lambda t: cdf(t) - 0.5, a + 1e-12, b)
        np.testing.assert_allclose(float(noise_lib.marchenko_pastur_median(beta)), ref, rtol=1e-4)


# --- determinism, jit, vmap, no recompilation ------------------------------------------------


def test_deterministic_from_the_key():
    a = cj.clair(small_federation(seed=7).updates)
    b = cj.clair(small_federation(seed=7).updates)
    chex.assert_trees_all_equal(a, b)
    c = cj.clair(small_federation(seed=8).updates)
    assert not np.array_equal(np.asarray(a.refined), np.asarray(c.refined))


class TestTransforms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        x = small_federation(seed=1).updates

        @self.variant
        def run(x):
            return cj.clair(x)

        chex.assert_trees_all_close(run(x), cj.clair(x), atol=1e-5)


def test_vmap_over_modules_equals_loop():
    xs = jnp.stack([small_federation(seed=s).updates for s in range(3)])
    batched = jax.vmap(partial(cj.clair, max_rank=4))(xs)
    for i in range(3):
        single = cj.clair(xs[i], max_rank=4)
        np.testing.assert_array_equal(batched.collaborative[i], single.collaborative)
        assert int(batched.rank[i]) == int(single.rank)
        np.testing.assert_allclose(batched.refined[i], single.refined, atol=1e-4)
        np.testing.assert_allclose(batched.noise_scale[i], single.noise_scale, rtol=1e-4)


def test_no_recompilation_on_second_call():
    cj.clair(small_federation(seed=1).updates)
    before = core.clair_core._cache_size()
    cj.clair(small_federation(seed=2).updates)
    assert core.clair_core._cache_size() == before


# --- bad input --------------------------------------------------------------------------------

X = np.random.default_rng(0).normal(size=(5, 4, 2))


@pytest.mark.parametrize(
    "updates,kwargs,error,match",
    [
        (X[0], {}, ValueError, r"updates must have shape \(n, p, q\).*got shape \(4, 2\)"),
        (X[None], {}, ValueError, r"got shape \(1, 5, 4, 2\); batch several modules"),
        (X[:1], {}, ValueError, r"n >= 2 .*\(1, 4, 2\)"),
        (np.where(X > 1, np.nan, X), {}, ValueError, "updates contains NaN or inf"),
        ("abc", {}, TypeError, "updates must be an array of real numbers"),
        (X, {"rank": 5}, ValueError, r"rank must be in \[1, min\(p, n q\)\] = \[1, 4\].*got 5"),
        (X, {"rank": 0}, ValueError, r"rank must be in \[1, min\(p, n q\)\] = \[1, 4\].*got 0"),
        (X, {"rank": 2.0}, TypeError, "rank must be an int"),
        (X, {"max_rank": 9}, ValueError, r"max_rank must be in \[1, min\(p, n q\)\]"),
        (X, {"rank": 2, "max_rank": 3}, ValueError, "not both"),
        (X, {"threshold": -1.0}, ValueError, "threshold must be finite and non-negative"),
        (X, {"threshold": np.ones(2)}, ValueError, r"threshold must be a scalar, got shape \(2,\)"),
        (X, {"lam_nuc": -1.0}, ValueError, "lam_nuc must be finite and non-negative"),
        (X, {"lam_block": np.inf}, ValueError, "lam_block must be finite and non-negative"),
        (X, {"noise_scale": np.nan}, ValueError, "noise_scale must be finite and non-negative"),
        (X, {"contaminated": "drop"}, ValueError, "contaminated must be one of"),
        (X, {"noise_passes": -1}, ValueError, "noise_passes must be an int >= 0"),
        (X, {"noise_passes": True}, TypeError, "noise_passes must be an int"),
        (X, {"offset": "no"}, TypeError, "offset must be a bool"),
        (X, {"method": "sgd"}, ValueError, "method must be one of"),
        (X, {"tol": 0.0}, ValueError, "tol must be finite and > 0"),
    ],
)
def test_bad_input(updates, kwargs, error, match):
    with pytest.raises(error, match=match):
        cj.clair(updates, **kwargs)


def test_traced_rank_is_rejected():
    with pytest.raises(TypeError, match="rank must be a static Python int"):
        jax.jit(lambda x, r: cj.clair(x, rank=r))(X, 2)


def test_traced_bad_threshold_raises_at_run_time():
    with pytest.raises(Exception, match="threshold must be finite and non-negative"):
        jax.jit(lambda x, t: cj.clair(x, threshold=t).refined)(X, -1.0).block_until_ready()


# --- metrics ---------------------------------------------------------------------------------


def test_detection_metrics_hand_computed():
    t, f = True, False
    m = cj.detection_metrics([t, t, f, f, t], [t, f, t, f, t])  # TP 2, FP 1, FN 1
    assert (int(m.true_positives), int(m.false_positives), int(m.false_negatives)) == (2, 1, 1)
    np.testing.assert_allclose([m.precision, m.recall, m.f1], [2 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    m = cj.detection_metrics([t, f, f, f], [t, t, t, f])  # TP 1, FN 2
    np.testing.assert_allclose([m.precision, m.recall, m.f1], [1.0, 1 / 3, 0.5], rtol=1e-6)
    # Empty sets: nothing flagged and nothing to find is perfect; the rest follows.
    none, some = [f, f, f], [f, t, f]
    np.testing.assert_allclose(cj.detection_metrics(none, none)[:3], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(cj.detection_metrics(none, some)[:3], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(cj.detection_metrics(some, none)[:3], [0.0, 1.0, 0.0])
    # Leading axes are batch axes; jittable.
    flagged = jnp.array([[t, t, f, f, t], [f, f, f, f, f]])
    truth = jnp.array([[t, f, t, f, t], [f, f, f, f, f]])
    batch = jax.jit(cj.detection_metrics)(flagged, truth)
    np.testing.assert_allclose(batch.f1, [2 / 3, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"same shape, got \(2,\) and \(3,\)"):
        cj.detection_metrics([t, f], [t, f, f])


def test_subspace_distance_matches_principal_angles(rng):
    from scipy.linalg import subspace_angles

    a = np.linalg.qr(rng.normal(size=(9, 3)))[0]
    b = np.linalg.qr(rng.normal(size=(9, 3)))[0]
    expected = np.sqrt(2.0) * np.linalg.norm(np.sin(subspace_angles(a, b)))
    np.testing.assert_allclose(float(cj.subspace_distance(a, b)), expected, rtol=1e-5)
    padded = np.concatenate([b, np.zeros((9, 2))], axis=1)  # zero columns do not count
    np.testing.assert_allclose(float(cj.subspace_distance(a, padded)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(cj.subspace_distance(a, a[:, :2])), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="bases"):
        cj.subspace_distance(a, np.zeros((8, 3)))
    # Non-orthonormal bases used to give a meaningless number.
    with pytest.raises(ValueError, match=r"b must have orthonormal \(or zero\) columns"):
        cj.subspace_distance(a, 2.0 * b)
    with pytest.raises(ValueError, match=r"a must have orthonormal \(or zero\) columns"):
        cj.subspace_distance(rng.normal(size=(9, 3)), b)
    with pytest.raises(Exception, match=r"b must have orthonormal"):
        jax.block_until_ready(jax.jit(cj.subspace_distance)(a, b + 0.1))
    np.testing.assert_allclose(jax.jit(cj.subspace_distance)(a, padded), expected, rtol=1e-5)


# --- a coordinated group against diverse benign clients ---------------------------------------


def _coordinated_federation(seed: int, n: int = 20, p: int = 32, q: int = 32, r: int = 4):
    """Benign clients: each a different rank-r product (LoRA-like, no common subspace
    beyond a weak shared part); the first 30% send one identical rank-1 update, 3x larger."""
    rng = np.random.default_rng(seed)
    shared = np.linalg.qr(rng.normal(size=(p, r)))[0]
    own = np.einsum("npr,nrq->npq", rng.normal(size=(n, p, r)), rng.normal(size=(n, r, q)))
    x = own / np.sqrt(p) + 0.5 * np.einsum("pr,nrq->npq", shared, rng.normal(size=(n, r, q)))
    bad = np.arange(int(0.3 * n))
    attack = np.outer(rng.normal(size=p), rng.normal(size=q))
    x[bad] = 3.0 * attack * np.linalg.norm(x[-1]) / np.linalg.norm(attack)
    truth = np.zeros(n, bool)
    truth[bad] = True
    return jnp.asarray(x, jnp.float32), truth


@pytest.mark.parametrize("seed", [0, 1])
def test_benign_majority_refit_detects_a_coordinated_group(seed):
    x, truth = _coordinated_federation(seed)
    # Without the guard the group is the low-rank structure: the benign majority is flagged.
    plain = cj.clair(x, benign_majority=False)
    assert np.sum(np.asarray(plain.collaborative)) < x.shape[0] / 2
    assert not bool(plain.majority_refit)
    res = cj.clair(x, benign_majority=True)
    assert bool(res.majority_refit)
    np.testing.assert_array_equal(np.asarray(res.collaborative), ~truth)
    # The refit's result is self-consistent: its scores against its threshold.
    np.testing.assert_array_equal(res.collaborative, res.scores <= res.threshold)
    # Refinement and consensus use the benign majority.
    np.testing.assert_allclose(
        res.consensus, np.mean(np.asarray(x)[~truth], axis=0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_benign_majority_leaves_ordinary_detection_alone():
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(3), n=20, p=16, q=4, rank=2, fraction=0.3, noise=0.01
    )
    on, off = cj.clair(fed.updates, benign_majority=True), cj.clair(fed.updates)
    assert not bool(on.majority_refit)
    chex.assert_trees_all_equal(on, off)
    with pytest.raises(TypeError, match="benign_majority must be a bool"):
        cj.clair(fed.updates, benign_majority="yes")


def test_benign_majority_trades_away_a_low_rank_minority():
    """Noiseless, 60% dense contamination: off (the default) the rank-2 benign minority
    is recovered exactly; the benign-majority rule replaces it by the dense majority."""
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(0), n=20, p=16, q=4, rank=2, fraction=0.6, noise=0.0
    )
    benign = ~np.asarray(fed.contaminated)
    plain = cj.clair(fed.updates)
    np.testing.assert_array_equal(plain.collaborative, benign)
    assert float(cj.subspace_distance(fed.basis, plain.basis)) < 1e-3
    ruled = cj.clair(fed.updates, benign_majority=True)
    assert bool(ruled.majority_refit)
    assert np.sum(np.asarray(ruled.collaborative)) > 10


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, marks=pytest.mark.slow),
        pytest.param({"offset": True}, marks=pytest.mark.slow),
        pytest.param({"benign_majority": True}, marks=pytest.mark.slow),
    ],
)
def test_float32_data_stays_float32_with_x64_enabled(x64, kwargs):
    """NumPy scalars in the λ and σ̂ rules used to promote σ̂ to float64 under x64, and the
    noise passes' while_loop then failed on mismatched carry dtypes."""
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(0), n=12, p=10, q=3, rank=2, fraction=0.25, noise=0.01
    )
    x = fed.updates.astype(jnp.float32)
    res = cj.clair(x, **kwargs)
    for leaf in (res.refined, res.basis, res.noise_scale, res.threshold, res.lam_nuc):
        assert leaf.dtype == jnp.float32
    ref = cj.clair(fed.updates.astype(jnp.float64), **kwargs)
    np.testing.assert_array_equal(res.collaborative, ref.collaborative)


@pytest.mark.parametrize("offset", [pytest.param(False, marks=pytest.mark.slow), True])
def test_one_huge_client_neither_sets_the_noise_floor_nor_swamps_the_fit(offset):
    """The noise floor used to be a fraction of the RMS entry of all clients, so one client
    scaled by 3000 raised σ̂ 40-fold and hid the other contaminated clients; scaled by 1e6
    it swamped float32 precision (wrong rank), by 1e19 its squares overflowed."""
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(0), n=12, p=10, q=3, rank=2, fraction=0.25, noise=0.01
    )
    clean = cj.clair(fed.updates, offset=offset)
    contaminated = np.flatnonzero(np.asarray(fed.contaminated))
    np.testing.assert_array_equal(np.flatnonzero(~np.asarray(clean.collaborative)), contaminated)
    for scale in (300.0, 3e3, 1e6, 1e30):
        x = fed.updates.at[contaminated[0]].multiply(scale)
        res = cj.clair(x, offset=offset)
        np.testing.assert_array_equal(res.collaborative, clean.collaborative)
        assert int(res.rank) == 2
        np.testing.assert_allclose(res.noise_scale, clean.noise_scale, rtol=0.1)
        assert np.isfinite(np.asarray(res.refined)).all()
        # Screened (step 0) beyond 1e3 times the median client's size: score inf.
        assert np.isinf(res.scores[contaminated[0]]) == (scale > detection.SCREEN_RATIO)


def test_a_client_at_the_top_of_the_float32_range_is_screened():
    """Screening (step 0) runs on the updates as given: the updates used to be scaled to
    unit size first, and a client of 1e36 next to LoRA-sized updates (1e-3) overflowed to
    inf and failed with 'updates contains NaN or inf'; its size (x / max, the reciprocal
    of 3e38 flushed to zero) came out 0."""
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(0), n=12, p=10, q=3, rank=2, fraction=0.25, noise=0.01
    )
    x = fed.updates * 1e-3
    clean = cj.clair(x)
    first = int(np.flatnonzero(np.asarray(fed.contaminated))[0])
    for value in (1e36, 3e38):
        res = cj.clair(x.at[first].set(value))
        assert np.isinf(res.scores[first])
        np.testing.assert_array_equal(res.collaborative, clean.collaborative)
        others = np.arange(12) != first
        np.testing.assert_allclose(res.refined[others], clean.refined[others], rtol=1e-5)


@pytest.mark.parametrize("offset", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_majority_of_empty_updates_leaves_detection_on(offset):
    """More than half of the clients sending nothing (zero updates; with an offset, the
    common part unchanged) made the median client size, hence the noise floor, σ̂, the
    λ's and τ, exactly zero: rank 16 for data of rank 6, every score 0 and the dense
    client collaborative (offset: the benign clients flagged on rounding residuals)."""
    rng = np.random.default_rng(0)
    p, q = 16, 4
    basis = np.linalg.qr(rng.normal(size=(p, 2)))[0]
    benign = [basis @ rng.normal(size=(2, q)) for _ in range(4)]
    idle = [np.zeros((p, q))] * 6
    x = np.stack(idle + benign + [rng.normal(size=(p, q))]).astype(np.float32)
    if offset:
        x = x + rng.normal(size=(p, q)).astype(np.float32)  # a common W_0
    res = cj.clair(x, offset=offset)
    assert int(res.rank) == 2
    assert float(res.noise_scale) > 0 and float(res.threshold) > 0
    np.testing.assert_array_equal(res.collaborative, np.arange(11) < 10)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_is_processed_in_float32(dtype):
    fed = small_federation()
    res = cj.clair(fed.updates.astype(dtype))
    assert res.refined.dtype == jnp.float32
    np.testing.assert_array_equal(res.collaborative, ~fed.contaminated)


@pytest.mark.parametrize("power", [-80, 5, 60])
def test_clair_scales_exactly_with_a_power_of_two(power):
    """Every step is equivariant and runs on the updates normalised by a power of two:
    ``clair(2^k X)`` is ``clair(X)`` with every size times ``2^k``, bit for bit. Without
    the normalisation float32 updates of size 1e-20 underflowed the squares of the noise
    estimate (σ̂ 14x too large, every client flagged collaborative)."""
    fed = small_federation(seed=2)
    factor = 2.0**power
    ref = cj.clair(fed.updates, offset=True)
    res = cj.clair(fed.updates * factor, offset=True)
    assert bool(jnp.all(res.collaborative == ~fed.contaminated))
    for name in ("basis", "rank", "collaborative", "majority_refit"):
        np.testing.assert_array_equal(getattr(res, name), getattr(ref, name))
    sizes = ("refined", "consensus", "scores", "threshold", "noise_scale", "lam_nuc", "lam_block")
    for name in (*sizes, "block_norms"):
        np.testing.assert_array_equal(getattr(res, name), getattr(ref, name) * factor)
    sol, want = res.decomposition, ref.decomposition
    for name in ("low_rank", "sparse", "offset"):
        np.testing.assert_array_equal(getattr(sol, name), getattr(want, name) * factor)
    assert int(sol.num_iters) == int(want.num_iters)
