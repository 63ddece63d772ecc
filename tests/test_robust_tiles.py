"""The tiled paths of the coordinate-wise rules and Krum's exact distances against NumPy.

The median and trimmed mean run their sorting network leaf by leaf in column
tiles, and the pairwise distances are summed tile by tile at a per-pair scale
with an exact recomputation of tiny distances; the tile sizes are shrunk here so
that small problems take every path (several tiles, an overlapping last tile, a
tail).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import clair_jax as cj
from clair_jax._src.aggregators import distances, robust, sorting

KEY = jax.random.key(0)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(sorting, "TILE_ENTRIES", 64)
    monkeypatch.setattr(distances, "TILE_PAIR_ELEMENTS", 64)


def make(rng, n, shapes=((5, 3, 7), (4, 3, 9)), scale=1.0):
    clients = {
        f"m{k}": cj.LoRAFactors(
            B=(scale * rng.normal(size=(n, p, r))).astype(np.float32),
            A=(scale * rng.normal(size=(n, r, q))).astype(np.float32),
        )
        for k, (p, r, q) in enumerate(shapes)
    }
    global_ = jax.tree.map(lambda x: np.zeros(x.shape[1:], np.float32), clients)
    return clients, global_


def flat(clients, rows=None):
    leaves = jax.tree.leaves(clients)
    x = np.concatenate([np.asarray(v, np.float64).reshape(len(v), -1) for v in leaves], axis=1)
    return x if rows is None else x[rows]


def np_log_sq_distances(x):
    with np.errstate(divide="ignore"):
        return np.log(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def aggregate(rule, clients, global_, n):
    return jax.jit(rule.aggregate)(clients, global_, jnp.ones((n,)), jnp.int32(1), KEY)


@pytest.mark.parametrize("n", [8, pytest.param(70, marks=pytest.mark.slow)])  # 70: jnp.sort
def test_median_and_trimmed_mean_in_tiles_match_numpy_with_excluded_clients(small_tiles, rng, n):
    clients, global_ = make(rng, n)
    bad = [1, 3]
    clients["m0"] = clients["m0"]._replace(B=clients["m0"].B.copy())
    clients["m0"].B[bad[0], 0, 0] = np.nan  # screened out: non-finite
    clients["m1"] = clients["m1"]._replace(A=clients["m1"].A.copy())
    clients["m1"].A[bad[1]] *= 1e6  # screened out: norm outlier
    keep = np.setdiff1d(np.arange(n), bad)
    res = aggregate(cj.coordinate_median(), clients, global_, n)
    assert np.flatnonzero(np.asarray(res.flagged)).tolist() == bad
    beta = 0.2
    res_t = aggregate(cj.trimmed_mean(beta), clients, global_, n)
    for name, f in clients.items():
        for field in ("B", "A"):
            x = np.asarray(getattr(f, field), np.float64)[keep]
            np.testing.assert_allclose(
                getattr(res.global_[name], field), np.median(x, axis=0), rtol=1e-6, atol=1e-7
            )
            np.testing.assert_allclose(
                getattr(res_t.global_[name], field),
                scipy.stats.trim_mean(x, beta, axis=0),
                rtol=1e-5,
                atol=1e-6,
            )


@pytest.mark.parametrize("n", [7])
def test_tiles_do_not_change_the_median_or_trimmed_mean(monkeypatch, rng, n):
    """Bit for bit: the tiles only split the columns the network sorts."""
    clients, global_ = make(rng, n, shapes=((37, 4, 29),))
    untiled = [aggregate(rule, clients, global_, n).global_ for rule in _rules()]
    monkeypatch.setattr(sorting, "TILE_ENTRIES", 5 * n)  # 5 columns: overlapping last tile
    tiled = [aggregate(rule, clients, global_, n).global_ for rule in _rules()]
    for a, b in zip(jax.tree.leaves(untiled), jax.tree.leaves(tiled), strict=True):
        np.testing.assert_array_equal(a, b)


def _rules():
    return cj.coordinate_median(), cj.trimmed_mean(0.25)


@pytest.mark.parametrize("n", [3, pytest.param(33, marks=pytest.mark.slow)])
def test_log_squared_distances_match_numpy(small_tiles, rng, n):
    clients, _ = make(rng, n)
    got = np.asarray(distances.log_squared_distances(clients))
    want = np_log_sq_distances(flat(clients))
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(got[off], want[off], atol=2e-6)  # logs: relative distances
    assert np.all(got[~off] == -np.inf)
    # Module by module, combined by logaddexp: the same distances.
    parts = [np.asarray(distances.log_squared_distances(f)) for f in clients.values()]
    np.testing.assert_allclose(np.logaddexp(*parts)[off], got[off], atol=2e-6)
    # Rows and one leaf per client give the same result.
    rows = jnp.asarray(flat(clients), jnp.float32)
    np.testing.assert_allclose(distances.log_squared_distances(rows)[off], got[off], atol=2e-6)


def test_distances_of_identical_near_identical_huge_and_tiny_clients_are_exact(small_tiles):
    """Identical clients are at -inf; clients equal up to a few units in the last place,
    clients of 1e30 and of 1e-30, and a mix of both are exact (the per-pair scale,
    and the exact recomputation of the pairs whose scaled distance is tiny)."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 50)).astype(np.float32)
    rows = np.repeat(base, 8, axis=0)
    rows[1, 7] = np.nextafter(rows[1, 7], np.float32(np.inf))  # one ulp apart
    rows[2, :3] = np.nextafter(rows[2, :3], np.float32(-np.inf))
    rows[3] = rows[2]  # identical pair
    rows[4] = (rows[4] * 1e30).astype(np.float32)
    rows[5] = rows[4]
    rows[5, 0] = np.nextafter(rows[5, 0], np.float32(np.inf))  # huge, near-identical
    rows[6] = (base[0] * 1e-30).astype(np.float32)
    rows[7] = rows[6]
    rows[7, 49] = np.float32(0)  # tiny, differing in one entry
    got = np.asarray(distances.log_squared_distances(jnp.asarray(rows)))
    want = np_log_sq_distances(rows.astype(np.float64))
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite)
    assert got[2, 3] == -np.inf and got[3, 2] == -np.inf
    # Logs to float32 rounding: relative distance errors of a few units in 1e-6.
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-7, atol=2e-6)


def test_distances_skip_excluded_clients_and_propagate_nan(small_tiles, rng):
    clients, _ = make(rng, 6)
    excluded = np.array([False, True, False, False, True, False])
    leaf = clients["m0"].B.copy()
    leaf[1] = np.inf  # an excluded client's factors are never read
    clients["m0"] = clients["m0"]._replace(B=leaf)
    got = np.asarray(distances.log_squared_distances(clients, jnp.asarray(excluded)))
    keep = np.flatnonzero(~excluded)
    want = np_log_sq_distances(flat(clients, keep))
    off = ~np.eye(len(keep), dtype=bool)
    np.testing.assert_allclose(got[np.ix_(keep, keep)][off], want[off], atol=2e-6)
    assert np.all(got[excluded] == np.inf) and np.all(got[:, excluded] == np.inf)
    leaf = leaf.copy()
    leaf[0, 0, 0] = np.nan
    clients["m0"] = clients["m0"]._replace(B=leaf)
    got = np.asarray(distances.log_squared_distances(clients, jnp.asarray(excluded)))
    assert np.isnan(got[0, 2]) and np.isfinite(got[2, 3])
    with pytest.raises(ValueError, match="excluded must have shape"):
        distances.log_squared_distances(clients, jnp.zeros((5,), bool))
    with pytest.raises(ValueError, match="leading client axis"):
        distances.log_squared_distances({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))})


@pytest.mark.parametrize("n,f,m", [(9, 2, 1), pytest.param(70, 5, 40, marks=pytest.mark.slow)])
def test_krum_in_tiles_matches_numpy_distances(small_tiles, n, f, m):
    rng = np.random.default_rng(n)
    clients, global_ = make(rng, n, shapes=((5, 2, 6),))
    leaf = clients["m0"].B.copy()
    leaf[2] = leaf[1]  # identical clients (distance 0, recomputed exactly)
    leaf[n - 1] *= 30.0
    clients["m0"] = clients["m0"]._replace(B=leaf)
    clients["m0"].A[2] = clients["m0"].A[1]
    rule = cj.krum(f) if m == 1 else cj.multi_krum(f, m)
    res = aggregate(rule, clients, global_, n)
    x = flat(clients)
    d = np.exp(np_log_sq_distances(x))
    d[np.eye(n, dtype=bool)] = np.inf
    scores = np.sort(d, axis=1)[:, : n - f - 2].sum(axis=1)
    np.testing.assert_allclose(res.diagnostics["krum/scores"], scores, rtol=1e-5)
    chosen = np.argsort(scores, kind="stable")[:m]
    np.testing.assert_array_equal(~np.asarray(res.flagged), np.isin(np.arange(n), chosen))
    log_d = distances.log_squared_distances(clients)
    np.testing.assert_array_equal(
        robust.log_krum_scores_from_distances(log_d, f),
        robust.log_krum_scores(clients, f),
    )


def test_selected_mean_reading_only_the_selected_clients_is_the_masked_mean(rng):
    from clair_jax._src.aggregators.factor_algebra import selected_mean

    n = 7
    f = cj.LoRAFactors(
        B=rng.normal(size=(n, 4, 2)).astype(np.float32),
        A=rng.normal(size=(n, 2, 5)).astype(np.float32),
    )
    f.B[0] = np.inf  # not selected: never read
    p = jnp.asarray(rng.uniform(size=n), jnp.float32)
    selected = jnp.asarray([False, True, False, True, True, False, False])
    want = [
        np.einsum("n,n...->...", np.where(selected, p, 0), np.where(selected[:, None, None], x, 0))
        for x in (f.B, f.A)
    ]
    for at_most in (None, 3, 5):
        got = selected_mean(f, p, selected, at_most)
        np.testing.assert_allclose(got.B, want[0], rtol=1e-6)
        np.testing.assert_allclose(got.A, want[1], rtol=1e-6)
