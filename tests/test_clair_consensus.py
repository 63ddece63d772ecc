"""CLAIR's robust consensus: attackers inside the shared subspace and coordinated groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import clair_jax as cj
from clair_jax._src.clair import consensus as consensus_lib
from clair_jax._src.clair.factored import clair_factored

N, P, Q, R = 20, 32, 32, 3


def _federation(seed, kind, count, n=N, p=P, q=Q, r=R, het=0.3):
    """LoRA factors: benign ``B_i = U (M + het N_i) + noise``, ``A_i = A* + het noise``.

    ``kind="flip"``: ``count`` attackers send ``-3`` times the benign mean ``B`` (with
    the benign noise level) and the benign mean ``A``: about ``-3x`` the benign
    update, inside the shared subspace. ``kind="group"``: ``count`` attackers share
    their own random column space. Returns ``(factors, attackers, benign_mean)``.
    """
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(p, r)))[0]
    m = rng.normal(size=(r, r))
    noise = 0.01 * np.sqrt(np.mean(m**2) * r / p)
    b = np.einsum("pr,nrs->nps", u, m[None] + het * rng.normal(size=(n, r, r)))
    b = b + noise * rng.normal(size=b.shape)
    a = rng.normal(size=(r, q))[None] * np.sqrt(r / q) + het * np.sqrt(r / q) * rng.normal(
        size=(n, r, q)
    )
    bad = np.zeros(n, bool)
    bad[rng.permutation(n)[:count]] = True
    mean = np.einsum("npr,nrq->pq", b[~bad], a[~bad]) / np.sum(~bad)
    if kind == "flip":
        b[bad] = -3.0 * b[~bad].mean(0) + noise * rng.normal(size=(count, p, r))
        a[bad] = a[~bad].mean(0)
    else:
        u2 = np.linalg.qr(rng.normal(size=(p, r)))[0]
        b[bad] = (u2 @ m)[None] + noise * rng.normal(size=(count, p, r))
    factors = cj.LoRAFactors(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32))
    return factors, bad, mean


def _global_error(rule, factors, mean):
    n, p, r = factors.B.shape
    start = cj.LoRAFactors(jnp.zeros((p, r)), jnp.zeros((r, factors.A.shape[2])))
    res = rule.aggregate(
        {"m": factors}, {"m": start}, jnp.full((n,), 1.0 / n), 0, jax.random.key(0)
    )
    g = res.global_["m"]
    product = np.asarray(g.B, np.float64) @ np.asarray(g.A, np.float64)
    return np.linalg.norm(product - mean) / np.linalg.norm(mean), np.asarray(res.flagged)


@pytest.mark.parametrize("kind", ["flip", "group"])
@pytest.mark.parametrize("fraction", [0.3, 0.45])
def test_attacks_are_flagged_and_beat_the_geometric_median(kind, fraction):
    factors, bad, mean = _federation(1, kind, int(round(fraction * N)))
    error, flagged = _global_error(cj.clair_aggregator(), factors, mean)
    np.testing.assert_array_equal(flagged, bad)
    reference, _ = _global_error(cj.geometric_median(), factors, mean)
    assert error < reference, (error, reference)
    assert error < 0.01
    # Today's rule ("mean") takes the attackers in: its global adapter is poisoned.
    plain, plain_flagged = _global_error(cj.clair_aggregator(consensus="mean"), factors, mean)
    assert not plain_flagged.any() and plain > 0.3


def test_a_small_coordinated_group_is_flagged():
    """2 of 25 clients (8%) in their own subspace: flagged (inside the subspace)."""
    factors, bad, _ = _federation(2, "group", 2, n=25)
    x = jnp.einsum("npr,nrq->npq", factors.B, factors.A)
    res = cj.clair(x, consensus="robust")
    np.testing.assert_array_equal(~np.asarray(res.collaborative), bad)
    # The rank rule takes (some of) the group's directions in.
    assert int(cj.clair(x, consensus="mean").rank) > R
    # The factored path flags the same clients with the same scores inside the subspace.
    fact = clair_factored(factors, consensus="robust")
    np.testing.assert_array_equal(fact.collaborative, res.collaborative)


def test_a_coordinated_group_of_several_clients_is_left_out_of_the_subspace():
    """4 of 20 clients in their own subspace: their directions are not shared."""
    factors, bad, _ = _federation(6, "group", 4)
    res = cj.clair(jnp.einsum("npr,nrq->npq", factors.B, factors.A))
    np.testing.assert_array_equal(~np.asarray(res.collaborative), bad)
    assert int(res.rank) == R


@pytest.mark.slow
def test_factored_inside_scores_equal_the_dense_ones():
    factors, bad, _ = _federation(3, "flip", 6)
    dense = cj.clair(jnp.einsum("npr,nrq->npq", factors.B, factors.A), consensus="robust")
    fact = clair_factored(factors, consensus="robust")
    np.testing.assert_array_equal(fact.collaborative, ~bad)
    np.testing.assert_array_equal(dense.collaborative, ~bad)
    np.testing.assert_allclose(
        fact.coordinates.inside_scores, dense.inside_scores, rtol=2e-3, atol=1e-4
    )


def test_factored_inside_detection_on_the_basis_rank_columns_alone():
    """The narrowed detection (columns up to the narrowest static width that holds the rank)
    equals the full-width one, and falls back to it when the rank exceeds every width."""
    from clair_jax._src.clair import factored as factored_lib
    from clair_jax._src.solvers import factored as coordinates_lib

    factors, bad, _ = _federation(3, "flip", 6)
    fc = coordinates_lib.factored_coordinates(factors, common_right=False)
    small = cj.clair(fc.coords, contaminated="refine", consensus="rank")
    rank, full = int(small.rank), small.basis.shape[1]
    assert 1 < rank < full
    frame = coordinates_lib.common_right_basis(factors.A)
    narrowed = (rank - 1, rank, (rank - 2, rank - 1), (rank - 1, rank + 1, rank + 3))
    results = {
        width: factored_lib._detect_inside(small, fc.left_coef, frame, width)
        for width in (*narrowed, full)
    }
    for width in narrowed:
        np.testing.assert_allclose(
            results[width].inside_scores, results[full].inside_scores, rtol=1e-5
        )
        np.testing.assert_array_equal(results[width].collaborative, results[full].collaborative)
    np.testing.assert_array_equal(results[full].collaborative, ~bad)


def _numpy_geometric_median(points):
    """Minimiser of the sum of Euclidean distances (SciPy, from the coordinate mean)."""
    points = np.asarray(points, np.float64)

    def cost(z):
        return np.sum(np.linalg.norm(points - z[None], axis=1))

    return minimize(cost, points.mean(0), method="Nelder-Mead" if points.shape[1] < 3 else "BFGS",
                    options={"maxiter": 20000, "gtol": 1e-10}).x  # fmt: skip


def test_geometric_median_matches_scipy(rng):
    points = rng.normal(size=(15, 6))
    points[:5] += 20.0  # a third far away: the median stays with the rest
    members = np.ones(15, bool)
    members[0] = False
    got = consensus_lib.geometric_median(jnp.asarray(points), jnp.asarray(members), iters=500)
    want = _numpy_geometric_median(points[members])
    np.testing.assert_allclose(got, want, atol=2e-4)


@pytest.mark.parametrize("count", [1, 2, 7, 8, 9])
def test_masked_column_median_matches_numpy(x64, rng, count):
    """The members' median of every column (odd and even counts, ties) is NumPy's."""
    points = rng.normal(size=(9, 40))
    points[:, :5] = np.round(points[:, :5])  # ties
    members = np.zeros(9, bool)
    members[rng.permutation(9)[:count]] = True
    got = consensus_lib.masked_column_median(jnp.asarray(points), jnp.asarray(members))
    np.testing.assert_allclose(got, np.median(points[members], axis=0), rtol=1e-15, atol=0)


def test_inside_scores_match_a_numpy_reference():
    factors, bad, _ = _federation(4, "flip", 6)
    x = np.asarray(jnp.einsum("npr,nrq->npq", factors.B, factors.A), np.float64)
    res = cj.clair(jnp.asarray(x, jnp.float32), consensus="robust")
    basis = np.asarray(res.basis, np.float64)[:, : int(res.rank)]
    coords = np.einsum("pk,npq->nkq", basis, x).reshape(N, -1)
    # The centre: the geometric median of the clients collaborative before step 4b (the
    # attackers are then still in, at -3x the benign mean: the centre resists them).
    centre = _numpy_geometric_median(coords)
    want = np.linalg.norm(coords - centre[None], axis=1)
    np.testing.assert_allclose(res.inside_scores, want, rtol=2e-3)
    np.testing.assert_array_equal(res.collaborative, res.inside_scores <= res.inside_threshold)


def test_no_change_without_attackers_inside_the_subspace():
    """Dense contamination (off the subspace) and heterogeneous benign clients: the robust
    consensus flags the same clients and refines the same estimates as the plain one."""
    fed = cj.simulate.shared_subspace_updates(
        jax.random.key(5), n=20, p=16, q=4, rank=2, fraction=0.25, noise=0.01
    )
    robust = cj.clair(fed.updates, consensus="robust")
    plain = cj.clair(fed.updates, consensus="mean")
    np.testing.assert_array_equal(robust.collaborative, ~np.asarray(fed.contaminated))
    np.testing.assert_array_equal(robust.collaborative, plain.collaborative)
    assert int(robust.rank) == int(plain.rank) == 2
    np.testing.assert_allclose(robust.refined, plain.refined, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(robust.consensus, plain.consensus, rtol=1e-4, atol=1e-5)
    assert float(plain.inside_threshold) == np.inf and not np.any(plain.inside_scores)


def test_shared_directions_keep_what_a_majority_carries(rng):
    """Blocks of 14 clients in span(U) and 6 in span(U2) (larger): the rule keeps span(U)."""
    p, q, r = 12, 5, 2
    u = np.linalg.qr(rng.normal(size=(p, 2 * r)))[0]
    u1, u2 = u[:, :r], u[:, r:]
    blocks = np.concatenate(
        [
            np.einsum("pr,nrq->npq", u1, rng.normal(size=(14, r, q))),
            np.einsum("pr,nrq->npq", u2, 5.0 * rng.normal(size=(6, r, q))),
        ]
    )
    mat = np.concatenate(list(blocks), axis=1)
    left, s, _ = np.linalg.svd(mat, full_matrices=False)
    members = jnp.ones(20, bool)
    args = (jnp.asarray(left), jnp.asarray(s), jnp.asarray(blocks), members, jnp.asarray(1e-3))
    basis, rank = consensus_lib.shared_directions(*args, left.shape[1], True)
    assert int(rank) == r
    kept = np.asarray(basis)[:, :r]
    np.testing.assert_allclose(kept @ kept.T, u1 @ u1.T, atol=1e-5)
    # Plain rule: all 2r directions, the group's (larger) first.
    _, plain_rank = consensus_lib.shared_directions(*args, left.shape[1], False)
    assert int(plain_rank) == 2 * r


@pytest.mark.parametrize("group_rank", [2, 70])
def test_the_vote_on_the_leading_columns_equals_the_full_width_vote(rng, monkeypatch, group_rank):
    """Width 160 >= 2 VOTE_WIDTH: 14 clients share span(U1) (rank 2), 6 larger ones a
    ``group_rank``-dimensional span(U2). Plain rank 4 fits the narrow vote, which keeps
    span(U1); plain rank 72 does not and takes the full one (a 70-dimensional span that
    each of the 6 carries only part of stays, as directions of one or two clients do).
    Both equal the vote on all 160 columns (the narrowing switched off)."""
    p, q, r = 160, 12, 2
    u = np.linalg.qr(rng.normal(size=(p, r + group_rank)))[0]
    u1, u2 = u[:, :r], u[:, r:]
    blocks = np.concatenate(
        [
            np.einsum("pr,nrq->npq", u1, rng.normal(size=(14, r, q))),
            np.einsum("pr,nrq->npq", u2, 5.0 * rng.normal(size=(6, group_rank, q))),
        ]
    )
    left, s, _ = np.linalg.svd(np.concatenate(list(blocks), axis=1), full_matrices=False)
    args = (jnp.asarray(left), jnp.asarray(s), jnp.asarray(blocks), jnp.ones(20, bool))
    args = (*args, jnp.asarray(1e-3))
    vote_width = consensus_lib.VOTE_WIDTH
    assert left.shape[1] >= 2 * vote_width
    basis, rank = consensus_lib.shared_directions(*args, left.shape[1], True)
    monkeypatch.setattr(consensus_lib, "VOTE_WIDTH", 10**6)
    full_basis, full_rank = consensus_lib.shared_directions(*args, left.shape[1], True)
    rank = int(rank)
    assert rank == int(full_rank) == (r if group_rank == 2 else rank) and rank > 0
    kept, full_kept = np.asarray(basis)[:, :rank], np.asarray(full_basis)[:, :rank]
    np.testing.assert_allclose(kept @ kept.T, full_kept @ full_kept.T, atol=1e-5)
    if group_rank == 2:
        np.testing.assert_allclose(kept @ kept.T, u1 @ u1.T, atol=1e-5)
    else:
        assert rank > vote_width


def test_bad_consensus_is_rejected():
    x = jnp.ones((4, 3, 2))
    with pytest.raises(ValueError, match="consensus"):
        cj.clair(x, consensus="median")
    with pytest.raises(ValueError, match="consensus"):
        clair_factored(cj.LoRAFactors(jnp.ones((4, 3, 1)), jnp.ones((4, 1, 2))), consensus="x")
