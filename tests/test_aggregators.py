"""Every aggregation rule against a plain NumPy reference, plus the shared interface."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src import aggregators as ag

KEY = jax.random.key(0)
SHAPES = {"q_proj": (6, 3, 5), "v_proj": (4, 3, 7)}  # module -> (p, r, q)


def make_adapters(seed, n=7, shapes=SHAPES, dtype=np.float64):
    """Random stacked client adapters, a random global adapter and random weights."""
    rng = np.random.default_rng(seed)
    clients, global_ = {}, {}
    for name, (p, r, q) in shapes.items():
        clients[name] = ag.LoRAFactors(
            B=rng.normal(size=(n, p, r)).astype(dtype), A=rng.normal(size=(n, r, q)).astype(dtype)
        )
        global_[name] = ag.LoRAFactors(
            B=rng.normal(size=(p, r)).astype(dtype), A=rng.normal(size=(r, q)).astype(dtype)
        )
    weights = rng.uniform(0.5, 2.0, size=n).astype(dtype)
    return clients, global_, weights


def run(aggregator, clients, global_, weights, round_index=1, key=KEY):
    return aggregator.aggregate(clients, global_, weights, jnp.int32(round_index), key)


def np_error(f, p, g):
    """||Σ p_i B_i A_i - B_g A_g||_F in NumPy."""
    exact = np.einsum("n,npr,nrq->pq", p, np.asarray(f.B), np.asarray(f.A))
    return np.linalg.norm(exact - np.asarray(g.B) @ np.asarray(g.A))


def assert_broadcast(res, n):
    for name, g in res.global_.items():
        for field in ("B", "A"):
            stacked = np.asarray(getattr(res.clients[name], field))
            assert stacked.shape == (n, *getattr(g, field).shape)
            expected = np.broadcast_to(getattr(g, field), stacked.shape)
            np.testing.assert_array_equal(stacked, expected)


def assert_errors(res, clients, weights):
    p = weights / weights.sum()
    for name, f in clients.items():
        np.testing.assert_allclose(
            res.diagnostics[f"aggregation_error/{name}"],
            np_error(f, p, res.global_[name]),
            rtol=1e-10,
        )


# --- local only and FedIT -----------------------------------------------------------------


def test_local_only_keeps_clients_and_global(x64):
    clients, global_, w = make_adapters(0)
    res = run(ag.local_only(), clients, global_, w)
    chex.assert_trees_all_equal(res.clients, clients)
    chex.assert_trees_all_equal(res.global_, global_)
    assert res.flagged.shape == (7,) and not bool(res.flagged.any())
    assert_errors(res, clients, w)


def test_fedit_matches_numpy(x64):
    clients, global_, w = make_adapters(1)
    res = run(ag.fedit(), clients, global_, w)
    p = w / w.sum()
    for name, f in clients.items():
        np.testing.assert_allclose(res.global_[name].B, np.tensordot(p, f.B, 1), rtol=1e-12)
        np.testing.assert_allclose(res.global_[name].A, np.tensordot(p, f.A, 1), rtol=1e-12)
    assert_broadcast(res, 7)
    assert_errors(res, clients, w)
    assert not bool(res.flagged.any())
    assert float(res.diagnostics["aggregation_error/q_proj"]) > 0.1


def test_default_dtype_is_kept():
    clients, global_, w = make_adapters(2, dtype=np.float32)
    res = run(ag.fedit(), clients, global_, w)
    assert res.global_["q_proj"].A.dtype == jnp.float32
    assert res.diagnostics["aggregation_error/v_proj"].dtype == jnp.float32
