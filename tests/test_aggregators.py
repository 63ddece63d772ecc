"""Every aggregation rule against a plain NumPy reference, plus the shared interface."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

import clair_jax as ag
from clair_jax._src.lora.model import LoRALinear

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


@pytest.mark.slow
def test_default_dtype_is_kept():
    clients, global_, w = make_adapters(2, dtype=np.float32)
    res = run(ag.fedit(), clients, global_, w)
    assert res.global_["q_proj"].A.dtype == jnp.float32
    assert res.diagnostics["aggregation_error/v_proj"].dtype == jnp.float32


# --- FlexLoRA and FFA-LoRA -----------------------------------------------------------------


def test_flexlora_is_best_rank_r_approximation_of_product_average(x64):
    clients, global_, w = make_adapters(3)
    res = run(ag.flexlora(), clients, global_, w)
    p = w / w.sum()
    for name, f in clients.items():
        r = f.A.shape[1]
        exact = np.einsum("n,npr,nrq->pq", p, f.B, f.A)
        u, s, vt = np.linalg.svd(exact)
        g = res.global_[name]
        np.testing.assert_allclose(np.asarray(g.B) @ np.asarray(g.A), (u[:, :r] * s[:r]) @ vt[:r])
        # Balanced factors B = U sqrt(S), A = sqrt(S) V^T.
        np.testing.assert_allclose(np.asarray(g.B).T @ g.B, np.diag(s[:r]), atol=1e-10)
        np.testing.assert_allclose(np.asarray(g.A) @ np.asarray(g.A).T, np.diag(s[:r]), atol=1e-10)
        np.testing.assert_allclose(
            res.diagnostics[f"aggregation_error/{name}"], np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-9
        )
    assert_broadcast(res, 7)
    assert_errors(res, clients, w)


@pytest.mark.slow
def test_flexlora_rank_above_product_rank_pads_with_zeros(x64):
    clients, global_, w = make_adapters(4, n=1, shapes={"w": (2, 3, 5)})
    res = run(ag.flexlora(), clients, global_, w)
    g, f = res.global_["w"], clients["w"]
    assert g.B.shape == (2, 3) and g.A.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(g.B) @ np.asarray(g.A), f.B[0] @ f.A[0], atol=1e-12)
    np.testing.assert_array_equal(g.B[:, 2], 0.0)
    assert float(res.diagnostics["aggregation_error/w"]) < 1e-12


@pytest.mark.parametrize("frozen", ["B", "A"])
def test_ffa_lora_averages_the_trainable_factor_exactly(x64, frozen):
    clients, global_, w = make_adapters(5)
    p = w / w.sum()
    # Clients kept the frozen factor at the broadcast value.
    clients = {
        name: f._replace(
            **{frozen: np.broadcast_to(getattr(global_[name], frozen), getattr(f, frozen).shape)}
        )
        for name, f in clients.items()
    }
    agg = ag.ffa_lora(frozen)
    assert agg.frozen_factor == frozen
    res = run(agg, clients, global_, w)
    trained = "A" if frozen == "B" else "B"
    for name, f in clients.items():
        g = res.global_[name]
        np.testing.assert_array_equal(getattr(g, frozen), getattr(global_[name], frozen))
        np.testing.assert_allclose(getattr(g, trained), np.tensordot(p, getattr(f, trained), 1))
        assert float(res.diagnostics[f"aggregation_error/{name}"]) < 1e-12
    assert_broadcast(res, 7)


def test_ffa_lora_default_freezes_the_random_factor_of_the_package_model():
    """As the paper (and PEFT), the down-projection A = lora_a^T is random and frozen."""
    assert ag.ffa_lora().frozen_factor == "A"
    layer = LoRALinear(5, 4, lora_rank=2, lora_alpha=2.0, rngs=nnx.Rngs(0))
    factors = {"A": layer.lora_a[...].T, "B": layer.lora_b[...].T}  # (r, in), (out, r)
    frozen = ag.ffa_lora().frozen_factor
    assert np.all(np.abs(np.asarray(factors[frozen])).sum(1) > 0)  # the random one
    trained = "A" if frozen == "B" else "B"
    assert not np.any(np.asarray(factors[trained]))  # the zero one
    assert ag.fedit().frozen_factor is None


# --- Byzantine-robust rules -----------------------------------------------------------------


def test_coordinate_median_matches_numpy(x64):
    for n in (7, 6):  # odd and even
        clients, global_, w = make_adapters(6, n=n)
        res = run(ag.coordinate_median(), clients, global_, w)
        for name, f in clients.items():
            np.testing.assert_allclose(res.global_[name].B, np.median(f.B, axis=0), rtol=1e-12)
            np.testing.assert_allclose(res.global_[name].A, np.median(f.A, axis=0), rtol=1e-12)
        assert_broadcast(res, n)
        assert_errors(res, clients, w)
        assert not bool(res.flagged.any())


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.45])
def test_trimmed_mean_matches_scipy(x64, beta):
    clients, global_, w = make_adapters(7, n=9)
    res = run(ag.trimmed_mean(beta), clients, global_, w)
    for name, f in clients.items():
        np.testing.assert_allclose(res.global_[name].B, scipy.stats.trim_mean(f.B, beta, axis=0))
        np.testing.assert_allclose(res.global_[name].A, scipy.stats.trim_mean(f.A, beta, axis=0))
    assert_errors(res, clients, w)


def np_flat(clients):
    return np.concatenate(
        [np.asarray(x).reshape(len(x), -1) for f in clients.values() for x in (f.B, f.A)], axis=1
    )


def np_krum_scores(x, f):
    n = len(x)
    scores = []
    for i in range(n):
        d = sorted(np.sum((x[i] - x[j]) ** 2) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


@pytest.mark.parametrize("f,m", [(1, 1), (2, 1), (2, 3), (0, 9)])
def test_krum_and_multi_krum_match_numpy(x64, f, m):
    clients, global_, w = make_adapters(8, n=9)
    agg = ag.krum(f) if m == 1 else ag.multi_krum(f, m)
    res = run(agg, clients, global_, w)
    scores = np_krum_scores(np_flat(clients), f)
    np.testing.assert_allclose(res.diagnostics["krum/scores"], scores, rtol=1e-10)
    chosen = np.argsort(scores, kind="stable")[:m]
    np.testing.assert_array_equal(~np.asarray(res.flagged), np.isin(np.arange(9), chosen))
    p = w[chosen] / w[chosen].sum()
    for name, fac in clients.items():
        np.testing.assert_allclose(res.global_[name].B, np.tensordot(p, fac.B[chosen], 1))
        np.testing.assert_allclose(res.global_[name].A, np.tensordot(p, fac.A[chosen], 1))
    assert_broadcast(res, 9)
    assert_errors(res, clients, w)


def np_weiszfeld(x, alpha, nu, iters):
    v = alpha @ x
    for _ in range(iters):
        beta = alpha / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = beta @ x / beta.sum()
    return v


def test_geometric_median_matches_numpy_weiszfeld(x64):
    clients, global_, w = make_adapters(9, n=8)
    p = w / w.sum()
    x = np_flat(clients)
    # A fixed number of iterations (tol tiny) against the same number in NumPy.
    res = run(ag.geometric_median(max_iter=7, tol=1e-300), clients, global_, w)
    assert int(res.diagnostics["geometric_median/num_iters"]) == 7
    np.testing.assert_allclose(_flat_global(res), np_weiszfeld(x, p, 1e-6, 7), rtol=1e-12)
    # Converged: the weighted sum of unit vectors toward the clients vanishes.
    res = run(ag.geometric_median(max_iter=2000, tol=1e-12), clients, global_, w)
    assert bool(res.diagnostics["geometric_median/converged"])
    v = _flat_global(res)
    unit = (x - v) / np.linalg.norm(x - v, axis=1, keepdims=True)
    assert np.linalg.norm(p @ unit) < 1e-9
    np.testing.assert_allclose(res.diagnostics["geometric_median/weights"].sum(), 1.0)
    assert_errors(res, clients, w)


def _flat_global(res):
    return np.concatenate([np.asarray(x).ravel() for f in res.global_.values() for x in (f.B, f.A)])


def test_robust_rules_resist_outliers(x64):
    """9 benign clients near one adapter, 2 sending huge factors."""
    rng = np.random.default_rng(10)
    n, n_bad = 11, 2
    clients, global_, _ = make_adapters(10, n=n, shapes={"w": (6, 2, 4)})
    benign = {}
    for name, g in global_.items():
        B = g.B + 0.01 * rng.normal(size=(n, *g.B.shape))
        A = g.A + 0.01 * rng.normal(size=(n, *g.A.shape))
        B[:n_bad] = 100.0 * rng.normal(size=(n_bad, *g.B.shape))
        A[:n_bad] = -100.0
        benign[name] = ag.LoRAFactors(B=B, A=A)
    w = np.ones(n)
    robust = [
        ag.coordinate_median(),
        ag.trimmed_mean(0.2),
        ag.krum(n_bad),
        ag.multi_krum(n_bad, 5),
        ag.geometric_median(),
    ]
    for agg in [ag.fedit(), *robust]:
        res = run(agg, benign, global_, w)
        dist = max(
            np.abs(np.asarray(res.global_[k].B) - np.mean(f.B[n_bad:], 0)).max()
            for k, f in benign.items()
        )
        if agg.name == "fedit":
            assert dist > 1.0
        else:
            assert dist < 0.05, agg.name
        if agg.name in ("krum", "multi_krum"):
            assert bool(np.all(np.asarray(res.flagged)[:n_bad]))


# --- every rule: transforms, dtype, interface -------------------------------------------------

# local_only, ffa_lora and coordinate_median add no code path of their own under jit.
JITTED = [
    ag.fedit,
    ag.flexlora,
    lambda: ag.fedrot(0.4),
    lambda: ag.trimmed_mean(0.2),
    lambda: ag.multi_krum(1, 3),
    ag.geometric_median,
]


class TestEveryRule(chex.TestCase):
    def test_jit_equals_no_jit_and_interface(self):
        # float64 and the shapes of the NumPy-reference tests above, so the eager
        # runs reuse their compiled operations.
        with jax.enable_x64(True):
            clients, global_, w = make_adapters(11)
            for factory in JITTED:
                agg = factory()
                assert isinstance(agg, ag.Aggregator) and isinstance(agg.name, str)
                res = jax.jit(agg.aggregate)(clients, global_, w, jnp.int32(3), KEY)
                assert isinstance(res, ag.AggregateResult)
                want = agg.aggregate(clients, global_, w, jnp.int32(3), KEY)
                chex.assert_trees_all_close(res, want, rtol=1e-10, atol=1e-10)
                chex.assert_trees_all_equal_structs(res.global_, global_)
                chex.assert_trees_all_equal_shapes(res.clients, clients)
                assert res.flagged.shape == (7,) and res.flagged.dtype == jnp.bool_
                chex.assert_tree_all_finite(res.global_)

    def test_no_recompilation_across_rounds(self):
        clients, global_, w = make_adapters(12, dtype=np.float32)
        agg = ag.fedrot(0.4)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def aggregate(clients, global_, w, t):
            return agg.aggregate(clients, global_, w, t, KEY)

        for t in range(3):
            aggregate(clients, global_, w, jnp.int32(t))


# --- bad input ------------------------------------------------------------------------------


def test_bad_adapters_are_rejected():
    clients, global_, w = make_adapters(13)
    agg = ag.fedit()
    with pytest.raises(ValueError, match="same modules"):
        run(agg, clients, {"q_proj": global_["q_proj"]}, w)
    bad = dict(
        clients, v_proj=ag.LoRAFactors(B=clients["v_proj"].B[:, :, :2], A=clients["v_proj"].A)
    )
    with pytest.raises(ValueError, match=r"module 'v_proj': rank mismatch"):
        run(agg, bad, global_, w)
    bad = dict(clients, v_proj=ag.LoRAFactors(B=clients["v_proj"].B[:5], A=clients["v_proj"].A[:5]))
    with pytest.raises(ValueError, match=r"module 'v_proj' has 5 clients.*other modules 7"):
        run(agg, bad, global_, w)
    bad_g = dict(global_, q_proj=ag.LoRAFactors(B=global_["q_proj"].B[:3], A=global_["q_proj"].A))
    with pytest.raises(ValueError, match=r"module 'q_proj': B of global_ must have shape \(6, 3\)"):
        run(agg, clients, bad_g, w)
    with pytest.raises(ValueError, match=r"weights must have shape \(n,\) = \(7,\)"):
        run(agg, clients, global_, w[:3])
    with pytest.raises(ValueError, match="weights must not all be zero"):
        run(agg, clients, global_, np.zeros(7))
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        run(agg, clients, global_, -w)
    with pytest.raises(TypeError, match="must be dicts"):
        run(agg, list(clients.values()), global_, w)
    with pytest.raises(TypeError, match=r"clients\['q_proj'\] must be LoRAFactors\(B, A\)"):
        run(agg, dict(clients, q_proj=clients["q_proj"].A), global_, w)
    # A plain {"B": .., "A": ..} dict or (B, A) tuple is accepted.
    plain = {k: {"B": f.B, "A": f.A} for k, f in clients.items()}
    chex.assert_trees_all_close(
        run(agg, plain, global_, w).global_, run(agg, clients, global_, w).global_
    )


@pytest.mark.slow
def test_non_finite_factors_are_screened_out_or_rejected_in_strict_mode():
    clients, global_, w = make_adapters(16)
    for value in (np.nan, np.inf):
        B = np.array(clients["q_proj"].B)
        B[0, 0, 0] = value
        bad = dict(clients, q_proj=ag.LoRAFactors(B=B, A=clients["q_proj"].A))
        for rule in (ag.fedit, ag.flexlora, lambda **k: ag.krum(1, **k), ag.coordinate_median):
            # Default: client 0 is excluded and flagged, the others aggregated.
            res = run(rule(), bad, global_, w)
            assert int(res.diagnostics["screened/reason"][0]) == 1 and bool(res.flagged[0])
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(res.global_))
            # Strict: a ValueError naming the client, the factor and the module.
            with pytest.raises(ValueError, match=r"client 0: non-finite B in module 'q_proj'"):
                run(rule(screen="raise"), bad, global_, w)
    # The server's own global adapter must be finite, in every mode.
    A_g = np.array(global_["v_proj"].A)
    A_g[1, 1] = np.nan
    bad_g = dict(global_, v_proj=ag.LoRAFactors(B=global_["v_proj"].B, A=A_g))
    with pytest.raises(ValueError, match=r"module 'v_proj': A of global_ contains NaN"):
        run(ag.fedit(), clients, bad_g, w)
    # Traced strict mode: a runtime error naming the client.
    with pytest.raises(Exception, match="client 0: non-finite B in module 'q_proj'"):
        jax.block_until_ready(jax.jit(ag.fedit(screen="raise").aggregate)(bad, global_, w, 1, KEY))


@pytest.mark.parametrize("dtype", [pytest.param(jnp.bfloat16, marks=pytest.mark.slow), jnp.float16])
@pytest.mark.slow
def test_half_precision_factors_are_factorised_in_float32(dtype):
    clients, global_, w = make_adapters(17, dtype=np.float32)
    half = jax.tree.map(lambda a: jnp.asarray(a, dtype), (clients, global_))
    for agg in (ag.flexlora(), ag.fedrot(0.5), ag.clair_aggregator()):
        res = run(agg, *half, w)
        ref = run(agg, clients, global_, w)  # the same rule in float32
        for name, g in res.global_.items():
            assert g.B.dtype == dtype and res.clients[name].A.dtype == dtype
            product = np.asarray(g.B, np.float32) @ np.asarray(g.A, np.float32)
            expected = np.asarray(ref.global_[name].B) @ np.asarray(ref.global_[name].A)
            scale = np.abs(expected).max()
            np.testing.assert_allclose(product / scale, expected / scale, atol=0.1)


HALF_RULES = [
    ag.fedit(),
    ag.flexlora(),
    ag.ffa_lora(),
    ag.fedrot(0.5),
    ag.coordinate_median(),
    ag.trimmed_mean(0.2),
    ag.krum(1),
    ag.multi_krum(1, 3),
    ag.geometric_median(),
]


@pytest.mark.parametrize("dtype", [jnp.float16, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("agg", HALF_RULES, ids=lambda a: a.name)
def test_half_precision_weights_and_distances_do_not_overflow(agg, dtype):
    # Example counts summing past float16's 65504, and clients whose squared
    # distances (~1e5) overflow float16: every rule must match its float32 self,
    # not return zeros (w / inf), client 0 (all Krum scores inf) or NaN (0 / 0).
    clients, global_, _ = make_adapters(31, n=7, dtype=np.float32)
    clients = jax.tree.map(lambda a: a * 30.0, clients)
    weights = np.full(7, 20000.0, np.float32)
    half = jax.tree.map(lambda a: jnp.asarray(a, dtype), (clients, global_))
    # The float32 reference sees the same (rounded) factors.
    rounded = jax.tree.map(lambda a: jnp.asarray(a, np.float32), half)
    res = run(agg, *half, weights)
    ref = run(agg, *rounded, weights)
    np.testing.assert_array_equal(res.flagged, ref.flagged)
    for name, g in res.global_.items():
        assert g.B.dtype == dtype and g.A.dtype == dtype
        for field in ("B", "A"):
            got = np.asarray(getattr(g, field), np.float32)
            expected = np.asarray(getattr(ref.global_[name], field))
            scale = np.abs(expected).max()
            assert scale > 1.0  # not the zero adapter
            np.testing.assert_allclose(got / scale, expected / scale, atol=1e-2)
        np.testing.assert_allclose(
            res.diagnostics[f"aggregation_error/{name}"],
            ref.diagnostics[f"aggregation_error/{name}"],
            rtol=0.05,
        )


def test_clair_aggregator_needs_two_clients():
    clients, global_, _ = make_adapters(0, n=1)
    with pytest.raises(ValueError, match="clair_aggregator needs clients from at least 2"):
        run(ag.clair_aggregator(), clients, global_, np.ones(1))


@pytest.mark.slow
def test_clair_aggregator_zero_weight_collaborative_clients_are_averaged_equally(x64):
    rng = np.random.default_rng(18)
    n, p, r, q = 10, 14, 2, 12
    u = np.linalg.qr(rng.normal(size=(p, r)))[0]
    B = np.einsum("pk,nkr->npr", u, rng.normal(size=(n, r, r))) + 0.01 * rng.normal(size=(n, p, r))
    A = rng.normal(size=(n, r, q))
    B[[0, 1]], A[[0, 1]] = rng.normal(size=(2, p, r)), rng.normal(size=(2, r, q))
    w = np.zeros(n)
    w[[0, 1]] = 1.0  # only the (flagged) outliers carry weight
    clients = {"w": ag.LoRAFactors(B=B, A=A)}
    global_ = {"w": ag.LoRAFactors(B=np.zeros((p, r)), A=np.zeros((r, q)))}
    res = run(ag.clair_aggregator(rank=r), clients, global_, w)
    np.testing.assert_array_equal(np.flatnonzero(res.flagged), [0, 1])
    x = np.einsum("npr,nrq->npq", B, A)
    g = res.global_["w"]
    np.testing.assert_allclose(
        np.asarray(g.B) @ g.A, np_best_rank(x[2:].mean(axis=0), r), atol=1e-10
    )


def test_bad_configuration_is_rejected():
    clients, global_, w = make_adapters(14, n=6)
    with pytest.raises(ValueError, match=r"Krum with f=2 needs n >= 2f \+ 3 = 7 clients, got n=6"):
        run(ag.krum(2), clients, global_, w)
    with pytest.raises(ValueError, match="m=7 is larger than the number of clients n=6"):
        run(ag.multi_krum(1, 7), clients, global_, w)
    for bad in (0.5, -0.1, "x"):
        with pytest.raises(ValueError, match=r"beta must be a number in \[0, 0.5\)"):
            ag.trimmed_mean(bad)
    ag.trimmed_mean(np.float32(0.1))  # any real number type
    with pytest.raises(ValueError, match="f must be an int >= 0"):
        ag.krum(-1)
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        ag.multi_krum(1, 0)
    with pytest.raises(ValueError, match="strength must be finite and >= 0"):
        ag.fedrot(-0.2)
    with pytest.raises(ValueError, match="frozen must be one of"):
        ag.ffa_lora("C")
    with pytest.raises(ValueError, match="nu must be finite and > 0"):
        ag.geometric_median(nu=0.0)


# --- CLAIR ----------------------------------------------------------------------------------


def np_best_rank(x, r):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u[..., :, :r] * s[..., None, :r]) @ vt[..., :r, :]


@pytest.mark.slow
def test_clair_aggregator_solves_modules_of_one_shape_together_like_one_by_one(x64):
    """Modules of one shape are stacked and mapped (one compiled CLAIR per shape); the
    diagnostics and adapters equal CLAIR run on each module alone."""
    from clair_jax._src.aggregators.clair_common import ROUND_TOL
    from clair_jax._src.clair.pipeline import clair
    from clair_jax._src.clair.refinement import refine

    rng = np.random.default_rng(16)
    n, r = 8, 2
    shapes = {"a": (10, 6), "b": (10, 6), "c": (6, 10), "d": (10, 6)}
    clients = {}
    for name, (p, q) in shapes.items():
        u = np.linalg.qr(rng.normal(size=(p, r)))[0]
        B = np.einsum("pk,nkr->npr", u, rng.normal(size=(n, r, r)))
        B[[2, 5]] = rng.normal(size=(2, p, r))
        clients[name] = ag.LoRAFactors(
            B=B + 0.01 * rng.normal(size=B.shape), A=rng.normal(size=(n, r, q))
        )
    global_ = {k: ag.LoRAFactors(B=f.B[0], A=f.A[0]) for k, f in clients.items()}
    # cj.clair's consensus rule: the comparison is of the batching, not of the rules.
    agg = ag.clair_aggregator(consensus="rank", server_math="dense")
    res = jax.jit(agg.aggregate)(clients, global_, np.ones(n), 0, KEY)
    for name, f in clients.items():
        x = np.einsum("npr,nrq->npq", f.B, f.A)
        alone = clair(x, benign_majority=True, tol=ROUND_TOL)  # the rules' tolerance
        np.testing.assert_array_equal(res.diagnostics[f"flagged/{name}"], ~alone.collaborative)
        np.testing.assert_allclose(res.diagnostics[f"scores/{name}"], alone.scores, rtol=1e-9)
        assert int(res.diagnostics[f"rank/{name}"]) == int(alone.rank)
        sol = alone.decomposition
        assert bool(res.diagnostics[f"converged/{name}"]) == bool(sol.converged)
        assert int(res.diagnostics[f"num_iters/{name}"]) == int(sol.num_iters) > 0
        # The refinement keeps the leading r directions (refine_rank="lora"); clients
        # flagged in any module keep their own adapters.
        _, refined = refine(x, alone.basis[:, :r], alone.collaborative)
        keep = ~np.asarray(res.flagged)[:, None, None]
        personal = np.einsum("npr,nrq->npq", res.clients[name].B, res.clients[name].A)
        np.testing.assert_allclose(
            np.where(keep, personal, 0.0),
            np.where(keep, np_best_rank(refined, r), 0.0),
            atol=1e-8,
            err_msg=name,
        )


@pytest.mark.slow
def test_clair_aggregator_on_products(x64):
    pytest.importorskip("clair_jax._src.clair")
    from clair_jax._src.clair.pipeline import clair

    rng = np.random.default_rng(15)
    n, p, r, q = 10, 14, 2, 12
    u = np.linalg.qr(rng.normal(size=(p, r)))[0]
    B = np.einsum("pk,nkr->npr", u, rng.normal(size=(n, r, r)))  # shared column space
    B += 0.01 * rng.normal(size=B.shape)
    A = rng.normal(size=(n, r, q))
    outliers = np.zeros(n, bool)
    outliers[[1, 6]] = True
    B[outliers] = rng.normal(size=(2, p, r))
    A[outliers] = rng.normal(size=(2, r, q))
    w = rng.uniform(0.5, 2.0, size=n)
    clients = {"w": ag.LoRAFactors(B=B, A=A)}
    global_ = {"w": ag.LoRAFactors(B=np.zeros((p, r)), A=np.zeros((r, q)))}
    # Jitted here; the row-space run below is eager.
    res = jax.jit(ag.clair_aggregator(rank=r).aggregate)(clients, global_, w, jnp.int32(0), KEY)
    np.testing.assert_array_equal(res.flagged, outliers)
    np.testing.assert_array_equal(res.diagnostics["flagged/w"], outliers)
    x = np.einsum("npr,nrq->npq", B, A)
    # Global: best rank-r approximation of the weighted mean of the collaborative updates.
    pc = np.where(outliers, 0.0, w) / w[~outliers].sum()
    g = res.global_["w"]
    global_update = np_best_rank(np.tensordot(pc, x, 1), r)
    np.testing.assert_allclose(np.asarray(g.B) @ g.A, global_update, atol=1e-10)
    # Personalised adapters: each collaborative client's refined update, re-factorised
    # to rank r; the flagged clients keep the factors they sent (flagged="trained").
    refined = np.asarray(clair(x, rank=r).refined)
    expected = np.where(outliers[:, None, None], x, np_best_rank(refined, r))
    personal = np.einsum("npr,nrq->npq", res.clients["w"].B, res.clients["w"].A)
    np.testing.assert_allclose(personal, expected, atol=1e-8)
    np.testing.assert_array_equal(res.clients["w"].B[outliers], B[outliers])
    np.testing.assert_array_equal(res.clients["w"].A[outliers], A[outliers])
    assert_errors(res, clients, w)
    # flagged="global": the flagged clients get the global adapter instead, the rest
    # is unchanged.
    res_g = ag.clair_aggregator(rank=r, flagged="global").aggregate(
        clients, global_, w, jnp.int32(0), KEY
    )
    personal_g = np.einsum("npr,nrq->npq", res_g.clients["w"].B, res_g.clients["w"].A)
    expected_g = np.where(outliers[:, None, None], global_update[None], expected)
    np.testing.assert_allclose(personal_g, expected_g, atol=1e-8)

    # Shared row space: the same clients transposed (B' = A^T, A' = B^T) give the
    # transposed result.
    swap = lambda f: ag.LoRAFactors(B=np.swapaxes(f.A, -1, -2), A=np.swapaxes(f.B, -1, -2))  # noqa: E731
    row = ag.clair_aggregator(shared_space="row", rank=r).aggregate
    res_t = row({"w": swap(clients["w"])}, {"w": swap(global_["w"])}, w, jnp.int32(0), KEY)
    np.testing.assert_array_equal(res_t.flagged, outliers)
    personal_t = np.einsum("npr,nrq->npq", res_t.clients["w"].B, res_t.clients["w"].A)
    np.testing.assert_allclose(np.swapaxes(personal_t, 1, 2), personal, atol=1e-8)
    g_t = res_t.global_["w"]
    np.testing.assert_allclose((np.asarray(g_t.B) @ g_t.A).T, np.asarray(g.B) @ g.A, atol=1e-10)


@pytest.mark.slow
def test_clair_aggregator_refines_on_at_most_the_lora_rank(x64):
    from clair_jax._src.clair.pipeline import clair
    from clair_jax._src.clair.refinement import refine

    rng = np.random.default_rng(4)
    n, p, r, q = 8, 12, 2, 10
    # Each client's B spans its own 2 directions of a common 5-dimensional space: the
    # clients' updates vary in 5 dimensions, more than r.
    u = np.linalg.qr(rng.normal(size=(p, 5)))[0]
    B = np.einsum("pk,nkr->npr", u, rng.normal(size=(n, 5, r))) + 0.01 * rng.normal(size=(n, p, r))
    A = rng.normal(size=(n, r, q))
    B[3] = rng.normal(size=(p, r))  # one client off the shared space
    clients = {"w": ag.LoRAFactors(B=B, A=A)}
    global_ = {"w": ag.LoRAFactors(B=np.zeros((p, r)), A=np.zeros((r, q)))}
    w = np.ones(n)
    x = np.einsum("npr,nrq->npq", B, A)
    reference = clair(x, offset=True)  # detection: CLAIR's own subspace
    assert int(reference.rank) > r
    outliers = ~np.asarray(reference.collaborative)
    for refine_rank, width in (("lora", r), (3, 3), (None, int(reference.rank))):
        res = ag.clair_aggregator(
            offset=True,
            refine_rank=refine_rank,
            consensus="rank",  # the reference's rule
        ).aggregate(clients, global_, w, jnp.int32(0), KEY)
        np.testing.assert_array_equal(res.flagged, outliers)
        assert int(res.diagnostics["rank/w"]) == int(reference.rank)
        assert int(res.diagnostics["refine_rank/w"]) == width
        _, refined = refine(x, reference.basis[:, :width], reference.collaborative)
        expected = np.where(outliers[:, None, None], x, np_best_rank(np.asarray(refined), r))
        personal = np.einsum("npr,nrq->npq", res.clients["w"].B, res.clients["w"].A)
        np.testing.assert_allclose(personal, expected, atol=1e-8)
    with pytest.raises(ValueError, match="refine_rank must be"):
        ag.clair_aggregator(refine_rank=0)


def test_clair_aggregator_rejects_bad_space():
    with pytest.raises(ValueError, match="shared_space must be one of"):
        ag.clair_aggregator(shared_space="diagonal")
    with pytest.raises(ValueError, match="contaminated= has no effect"):
        ag.clair_aggregator(contaminated="local")


def np_threshold(scores, z=3.5, rho=0.1, iters=4):
    """NumPy version of CLAIR's robust threshold with no noise term."""

    def tau_of(keep):
        m = np.median(scores[keep])
        spread = max(1.4826 * np.median(np.abs(scores[keep] - m)), rho * m)
        return m + z * spread

    keep = scores <= np.median(scores)
    for _ in range(iters - 1):
        keep = scores <= tau_of(keep)
    return tau_of(keep)


@pytest.mark.slow
def test_clair_aggregator_on_round_updates_with_client_detection(x64):
    """``measure="update"`` + ``detection="client"`` against a NumPy reference.

    Clients start from different adapters. Benign round updates lie in a shared
    column space in all three modules; clients 2 and 7 send random updates in
    every module; benign client 4 sends a random update in module ``"c"`` only:
    module-level detection flags it, the pooled client score does not.
    """
    from clair_jax._src.clair.pipeline import clair

    rng = np.random.default_rng(3)
    n, r = 10, 2
    shapes = {"a": (12, 10), "b": (9, 14), "c": (11, 11)}
    outliers = np.zeros(n, bool)
    outliers[[2, 7]] = True
    clients, start = {}, {}
    for name, (p, q) in shapes.items():
        u = np.linalg.qr(rng.normal(size=(p, r)))[0]
        B0 = np.einsum("pk,nkr->npr", u, rng.normal(size=(n, r, r)))
        A0 = rng.normal(size=(n, r, q))
        B1 = np.einsum("pk,nkr->npr", u, rng.normal(size=(n, r, r))) + 1e-3 * rng.normal(
            size=(n, p, r)
        )
        A1 = A0 + 0.1 * rng.normal(size=(n, r, q))
        bad = outliers | ((np.arange(n) == 4) & (name == "c"))
        B1[bad] = rng.normal(size=(int(bad.sum()), p, r))
        clients[name] = ag.LoRAFactors(B=B1, A=A1)
        start[name] = ag.LoRAFactors(B=B0, A=A0)
    global_ = {
        k: ag.LoRAFactors(B=np.zeros((p, r)), A=np.zeros((r, q))) for k, (p, q) in shapes.items()
    }
    w = rng.uniform(0.5, 2.0, size=n)

    # The rule on the products: the reference below is dense CLAIR's.
    module_rule = ag.clair_aggregator(rank=r, measure="update", server_math="dense")
    assert module_rule.uses_start
    res_module = module_rule.aggregate(clients, global_, w, jnp.int32(0), KEY, start=start)
    expected_module = outliers.copy()
    expected_module[4] = True
    np.testing.assert_array_equal(res_module.flagged, expected_module)
    # Module detection: each module's global averages that module's own collaborative
    # set, so client 4 (flagged in "c" only) still counts in "a".
    in_a = ~np.asarray(res_module.diagnostics["flagged/a"])
    np.testing.assert_array_equal(in_a, ~outliers)
    pa = np.where(in_a, w, 0.0) / w[in_a].sum()
    product_a = np.einsum("npr,nrq->npq", clients["a"].B, clients["a"].A)
    g_a = res_module.global_["a"]
    np.testing.assert_allclose(
        np.asarray(g_a.B) @ g_a.A, np_best_rank(np.tensordot(pa, product_a, 1), r), atol=1e-10
    )

    client_rule = jax.jit(
        ag.clair_aggregator(
            rank=r, measure="update", detection="client", server_math="dense"
        ).aggregate
    )
    res = client_rule(clients, global_, w, jnp.int32(0), KEY, start=start)
    np.testing.assert_array_equal(res.flagged, outliers)

    # NumPy reference of the pooling, the refinement and the re-factorisation.
    fits = {}
    for name, f in clients.items():
        origin = np.einsum("npr,nrq->npq", start[name].B, start[name].A)
        x = np.einsum("npr,nrq->npq", f.B, f.A) - origin
        # benign_majority as in the aggregator: the same compiled CLAIR as its eager run
        # above (a benign majority is collaborative here, so the step does not act).
        fits[name] = (x, origin, clair(x, rank=r, benign_majority=True))
    scores = np.stack([np.asarray(c.scores) for _, _, c in fits.values()])
    pooled = np.median(scores / np.median(scores, axis=1, keepdims=True), axis=0)
    np.testing.assert_allclose(res.diagnostics["client_scores"], pooled, rtol=1e-10)
    np.testing.assert_allclose(
        res.diagnostics["client_threshold"], np_threshold(pooled), rtol=1e-10
    )
    keep = ~outliers
    pc = np.where(keep, w, 0.0) / w[keep].sum()
    for name, (x, origin, c) in fits.items():
        consensus = x[keep].mean(axis=0)
        u = np.asarray(c.basis)
        refined = consensus + np.einsum("pk,kj,njq->npq", u, u.T, x - consensus)
        own = np.einsum("npr,nrq->npq", clients[name].B, clients[name].A)
        expected = np.where(keep[:, None, None], np_best_rank(origin + refined, r), own)
        got = np.einsum("npr,nrq->npq", res.clients[name].B, res.clients[name].A)
        np.testing.assert_allclose(got, expected, atol=1e-8)
        product = np.einsum("npr,nrq->npq", clients[name].B, clients[name].A)
        g = res.global_[name]
        np.testing.assert_allclose(
            np.asarray(g.B) @ g.A, np_best_rank(np.tensordot(pc, product, 1), r), atol=1e-10
        )
    assert_errors(res, clients, w)


def test_clair_aggregator_update_measure_needs_a_matching_start():
    clients, global_, w = make_adapters(0)
    rule = ag.clair_aggregator(rank=1, measure="update")
    with pytest.raises(ValueError, match="needs start="):
        rule.aggregate(clients, global_, w, jnp.int32(0), KEY)
    other, _, _ = make_adapters(1, n=5)
    with pytest.raises(ValueError):
        rule.aggregate(clients, global_, w, jnp.int32(0), KEY, start=other)
    with pytest.raises(ValueError, match="measure must be one of"):
        ag.clair_aggregator(measure="delta")
    with pytest.raises(ValueError, match="detection must be one of"):
        ag.clair_aggregator(detection="global")
    with pytest.raises(ValueError, match="flagged must be one of"):
        ag.clair_aggregator(flagged="drop")


@pytest.mark.parametrize("n", [2, 3, 7, 16, 31, 32, 33, 65])
def test_sorting_network_matches_sort(n):
    """The compare-exchange network behind the median and trimmed mean (and its jnp.sort
    fallback above NETWORK_MAX_CLIENTS) against NumPy, with ties."""
    from clair_jax._src.aggregators import sorting

    rows = np.random.default_rng(n).integers(-3, 4, size=(n, 37)).astype(np.float32)
    np.testing.assert_array_equal(
        np.stack(sorting.sorted_rows(jnp.asarray(rows))), np.sort(rows, 0)
    )
    np.testing.assert_array_equal(sorting.median_rows(jnp.asarray(rows)), np.median(rows, 0))


def test_a_rule_called_as_it_is_compiles_once(caplog):
    """``aggregate`` outside any ``jit`` (as the README calls it): the second call with the
    same shapes compiles nothing (the rule's core is jitted; eager, its conds and maps over
    fresh closures would compile on every call)."""
    rng = np.random.default_rng(0)
    n, p, q, r = 6, 12, 10, 2
    clients = {"m": ag.LoRAFactors(rng.normal(size=(n, p, r)), rng.normal(size=(n, r, q)))}
    clients = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), clients)
    start = {"m": ag.LoRAFactors(jnp.zeros((p, r)), jnp.zeros((r, q)))}
    rule = ag.clair_aggregator()
    first = rule.aggregate(clients, start, None, 0, jax.random.key(0))
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        second = rule.aggregate(clients, start, None, 1, jax.random.key(1))
        jax.block_until_ready(second)
    compiled = [rec.getMessage() for rec in caplog.records if "ompil" in rec.getMessage()]
    assert not compiled, compiled[:3]
    np.testing.assert_array_equal(first.flagged, second.flagged)
