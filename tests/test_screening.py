"""Screening: one client's NaN, inf, huge or scaled factors stop no rule and poison no state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clair_jax as cj
from clair_jax import data
from clair_jax._src.aggregators import screening
from clair_jax._src.federated import training
from clair_jax._src.federated.state import describe_screening
from tests.test_federated import CONFIG, FED
from tests.test_federated import N as FEDERATED_N

N, P, R, Q = 8, 8, 2, 8
BAD = 3
KEY = jax.random.key(0)

RULES = {
    "local_only": cj.local_only,
    "fedit": cj.fedit,
    "flexlora": cj.flexlora,
    "ffa_lora": cj.ffa_lora,
    "fedrot": cj.fedrot,
    "clair": functools.partial(cj.clair_aggregator, server_math="dense"),
    "coordinate_median": cj.coordinate_median,
    "trimmed_mean": functools.partial(cj.trimmed_mean, 0.2),
    "krum": functools.partial(cj.krum, 1),
    "multi_krum": functools.partial(cj.multi_krum, 1, 3),
    "geometric_median": cj.geometric_median,
    "flexlora_factored": cj.flexlora_factored,
    "clair_factored": cj.clair_aggregator_factored,
    "fedit_factored_errors": lambda screen="exclude": cj.with_factored_errors(
        cj.fedit(screen=screen)
    ),
}
# CLAIR's decomposition sees every client (an excluded one as the adapter it
# started from), so its result is not the rule on the benign clients alone.
NO_REFERENCE = {"clair", "clair_factored"}
# attack -> expected screening reason of the attacked client
ATTACKS = {"nan": 1, "inf": 1, "huge": 2, "scale_1e9": 2, "sign_flip": 0}


def benign_setup(seed=0, n=N):
    rng = np.random.default_rng(seed)
    g_b = rng.normal(size=(P, R)).astype(np.float32)
    g_a = rng.normal(size=(R, Q)).astype(np.float32)
    B = (g_b + 0.3 * rng.normal(size=(n, P, R))).astype(np.float32)
    A = (g_a + 0.3 * rng.normal(size=(n, R, Q))).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    return B, A, {"w": cj.LoRAFactors(B=g_b, A=g_a)}, weights


def attacked(attack, B, A, global_):
    B, A = B.copy(), A.copy()
    g = global_["w"]
    if attack == "nan":
        B[BAD, 0, 0] = np.nan
    elif attack == "inf":
        A[BAD, 1, 2] = np.inf
    elif attack == "huge":
        B[BAD] *= 1e20
        A[BAD] *= 1e20
    elif attack == "scale_1e9":  # the round's attack model: start + s (trained - start)
        B[BAD] = g.B + 1e9 * (B[BAD] - g.B)
        A[BAD] = g.A + 1e9 * (A[BAD] - g.A)
    elif attack == "sign_flip":
        B[BAD] = g.B - (B[BAD] - g.B)
        A[BAD] = g.A - (A[BAD] - g.A)
    return {"w": cj.LoRAFactors(B=B, A=A)}


def finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def product(f):
    return np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow)
        if n in ("clair_factored", "local_only", "krum")
        else n
        for n in RULES
    ],
)
def test_every_rule_goes_on_under_every_attack_under_jit(name):
    B, A, global_, w = benign_setup()
    agg = jax.jit(RULES[name]().aggregate)
    benign = np.arange(N) != BAD
    reference = None
    if name not in NO_REFERENCE:
        ref_clients = {"w": cj.LoRAFactors(B=B[benign], A=A[benign])}
        reference = RULES[name](screen="off").aggregate(
            ref_clients, global_, w[benign], jnp.int32(1), KEY
        )
    for attack, code in ATTACKS.items():
        res = agg(attacked(attack, B, A, global_), global_, w, jnp.int32(1), KEY)
        assert finite(res.global_) and finite(res.clients), (name, attack)
        reason = np.asarray(res.diagnostics["screened/reason"])
        assert reason[BAD] == code, (name, attack, reason)
        assert not reason[benign].any(), (name, attack, reason)
        assert not bool(res.diagnostics["screened/refused"])
        if code == 0:
            continue
        assert bool(res.flagged[BAD])
        weights = np.asarray(res.diagnostics["screened/weights"])
        np.testing.assert_allclose(weights[benign], w[benign] / w[benign].sum(), rtol=1e-6)
        assert weights[BAD] == 0
        # The excluded client starts the next round from the (new) global adapter.
        np.testing.assert_array_equal(res.clients["w"].B[BAD], res.global_["w"].B)
        if reference is None:
            continue
        # The rule on the benign clients alone, weights renormalised.
        expected = product(reference.global_["w"])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            product(res.global_["w"]) / scale, expected / scale, atol=2e-5, err_msg=name
        )
        got = np.einsum("npr,nrq->npq", *(np.asarray(x, np.float64) for x in res.clients["w"]))
        ref = np.einsum(
            "npr,nrq->npq", *(np.asarray(x, np.float64) for x in reference.clients["w"])
        )
        np.testing.assert_allclose(got[benign] / scale, ref / scale, atol=2e-5, err_msg=name)


def test_eager_calls_go_on():
    B, A, global_, w = benign_setup(1)
    clients = attacked("nan", B, A, global_)
    res = cj.krum(1).aggregate(clients, global_, w, jnp.int32(1), KEY)
    assert finite(res.global_) and int(res.diagnostics["screened/reason"][BAD]) == 1


def test_strict_mode_raises_naming_client_module_and_reason():
    B, A, global_, w = benign_setup(2)
    two = dict(
        global_, v=cj.LoRAFactors(B=np.ones((4, 2), np.float32), A=np.ones((2, 3), np.float32))
    )
    for attack, match in (
        ("nan", r"client 3: non-finite B in module 'w'"),
        ("inf", r"client 3: non-finite A in module 'w'"),
        ("huge", r"client 3: norm outlier"),
    ):
        clients = attacked(attack, B, A, global_)
        clients["v"] = cj.LoRAFactors(
            B=np.ones((N, 4, 2), np.float32), A=np.ones((N, 2, 3), np.float32)
        )
        agg = cj.fedit(screen="raise")
        with pytest.raises(ValueError, match=match):
            agg.aggregate(clients, two, w, jnp.int32(1), KEY)
        if attack != "nan":
            continue
        with pytest.raises(Exception, match=match):  # traced: a runtime error, same message
            jax.block_until_ready(jax.jit(agg.aggregate)(clients, two, w, jnp.int32(1), KEY))
    # Clean input passes strict mode unchanged.
    clean = {"w": cj.LoRAFactors(B=B, A=A)}
    strict = cj.fedit(screen="raise").aggregate(clean, global_, w, jnp.int32(1), KEY)
    default = cj.fedit().aggregate(clean, global_, w, jnp.int32(1), KEY)
    np.testing.assert_array_equal(strict.global_["w"].B, default.global_["w"].B)
    with pytest.raises(ValueError, match="screen must be one of"):
        cj.fedit(screen="skip")


def test_screening_rule_and_its_thresholds():
    B, A, global_, _ = benign_setup(3)
    # Every client 20x larger than the first: all pass (a common scale is no outlier).
    clients = {"w": cj.LoRAFactors(B=20 * B, A=A)}
    assert not bool(jnp.any(screening.screen_clients(clients).excluded))
    # Factors 500x (under max_ratio = 1e3) pass; 5000x do not.
    for factor, out in ((500.0, False), (5000.0, True)):
        B2 = B.copy()
        B2[BAD] *= factor
        res = screening.screen_clients({"w": cj.LoRAFactors(B=B2, A=A)})
        assert bool(res.excluded[BAD]) == out
        assert int(np.sum(np.asarray(res.excluded))) == int(out)
    # A small (or zero) client is never an outlier.
    B2 = B.copy()
    B2[BAD] = 0
    assert not bool(jnp.any(screening.screen_clients({"w": cj.LoRAFactors(B=B2, A=A)}).excluded))
    # Statistics at a safe scale: log norms of 1e30 factors are finite and exact.
    big = screening.screen_clients({"w": cj.LoRAFactors(B=1e30 * B, A=1e30 * A)})
    ref = screening.screen_clients({"w": cj.LoRAFactors(B=B, A=A)})
    np.testing.assert_allclose(big.log_factor_norm, ref.log_factor_norm + np.log(1e30), rtol=1e-5)
    np.testing.assert_allclose(
        big.log_product_norm, ref.log_product_norm + 2 * np.log(1e30), rtol=1e-5
    )
    # The product norm from Gram matrices equals ||B_i A_i||_F.
    direct = np.log(np.linalg.norm(np.einsum("npr,nrq->npq", B, A), axis=(1, 2)))
    np.testing.assert_allclose(ref.log_product_norm, direct, rtol=1e-5)
    with pytest.raises(ValueError, match="max_ratio must be > 1"):
        screening.screen_clients(clients, max_ratio=0.5)


def test_describe_renders_reasons():
    lines = screening.describe(
        np.array([0, 1, 2, 3]), np.array([-1, 1, -1, -1]), np.array([-1, 1, -1, -1]), ["v", "w"]
    )
    assert lines == [
        "client 1: non-finite A in module 'w'",
        "client 2: norm outlier",
        "client 3: non-finite result",
    ]


def test_all_clients_excluded_keeps_the_global_adapter():
    B, A, global_, w = benign_setup(4)
    B = B.copy()
    B[:, 0, 0] = np.nan
    res = cj.fedit().aggregate({"w": cj.LoRAFactors(B=B, A=A)}, global_, w, jnp.int32(1), KEY)
    assert bool(res.diagnostics["screened/refused"])
    np.testing.assert_array_equal(res.global_["w"].B, global_["w"].B)
    assert finite(res.clients) and bool(np.all(np.asarray(res.flagged)))


def test_geometric_median_of_a_1e20_client_is_finite_and_honest():
    B, A, global_, w = benign_setup(5)
    clients = attacked("huge", B, A, global_)
    res = cj.geometric_median(screen="off").aggregate(clients, global_, w, jnp.int32(1), KEY)
    # Independent reference: Weiszfeld in float64 NumPy (where 1e40 does not
    # overflow) on all clients. The far client pulls the median with a bounded
    # force (its weight), so the median stays near the benign clients'.
    f = clients["w"]
    rows = np.concatenate([f.B.reshape(N, -1), f.A.reshape(N, -1)], axis=1).astype(np.float64)
    alpha = w / w.sum()
    v = alpha @ rows
    for _ in range(3000):
        beta = alpha / np.maximum(np.linalg.norm(rows - v, axis=1), 1e-6)
        v = beta @ rows / beta.sum()
    got = np.concatenate([np.ravel(res.global_["w"].B), np.ravel(res.global_["w"].A)])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, v, atol=1e-3)
    benign = np.delete(rows, BAD, axis=0)
    assert np.abs(got - np.median(benign, axis=0)).max() < 3 * np.abs(benign).max()
    assert bool(res.diagnostics["geometric_median/converged"])
    assert float(res.diagnostics["geometric_median/weights"][BAD]) < 1e-12
    # Iterations exhausted: not converged, and said so.
    short = cj.geometric_median(screen="off", max_iter=1, tol=1e-12)
    res = short.aggregate(clients, global_, w, jnp.int32(1), KEY)
    assert not bool(res.diagnostics["geometric_median/converged"])
    assert finite(res.global_)


@pytest.mark.parametrize("rule", [cj.flexlora, lambda **k: cj.krum(1, **k), cj.fedit])
def test_huge_but_common_scale_is_aggregated_at_a_safe_scale(rule):
    # Every client at 1e20: no client is screened out, and products (1e40) are
    # never formed in float32: the result is the unscaled rule's, scaled.
    B, A, global_, w = benign_setup(6)
    res = rule().aggregate(
        {"w": cj.LoRAFactors(B=1e20 * B, A=1e20 * A)}, global_, w, jnp.int32(1), KEY
    )
    ref = rule().aggregate({"w": cj.LoRAFactors(B=B, A=A)}, global_, w, jnp.int32(1), KEY)
    assert finite(res.global_) and not np.any(np.asarray(res.diagnostics["screened/reason"]))
    got = product(cj.LoRAFactors(res.global_["w"].B / 1e20, res.global_["w"].A / 1e20))
    np.testing.assert_allclose(got, product(ref.global_["w"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.flagged, ref.flagged)


# --- the federated round ---------------------------------------------------------------------

# The tiny model and federation of the round tests in test_federated.
RN = FEDERATED_N


@functools.lru_cache(maxsize=1)
def _setup():
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(CONFIG, rngs=nnx.Rngs(0)))
    return graphdef, base, adapters, data.make_federation(jax.random.key(1), FED)


def _make(rule):
    graphdef, base, _, _ = _setup()
    return cj.make_round(
        graphdef, base, rule, local_steps=2, batch_size=3, optimizer=optax.adam(0.05)
    )


@functools.cache
def _round(name):
    """One compiled round per rule, shared by the tests below."""
    return _make(ROUND_RULES[name]())


def _state_finite(state) -> bool:
    return finite((state.global_, state.clients))


ROUND_RULES = {
    "fedit": cj.fedit,
    "krum": lambda: cj.krum(1),
    "geometric_median": cj.geometric_median,
    "local_only": cj.local_only,
    "flexlora": cj.flexlora,
    "ffa_lora": cj.ffa_lora,
    "fedrot": cj.fedrot,
    "clair": lambda: cj.clair_aggregator(measure="update"),
    "coordinate_median": cj.coordinate_median,
    "trimmed_mean": lambda: cj.trimmed_mean(0.2),
    "multi_krum": lambda: cj.multi_krum(1, 3),
}
FAST_ROUND_RULES = ("fedit",)  # one compiled round, shared by the default tests


@pytest.mark.parametrize(
    "name",
    [
        name if name in FAST_ROUND_RULES else pytest.param(name, marks=pytest.mark.slow)
        for name in ROUND_RULES
    ],
)
def test_make_round_goes_on_with_a_nan_client(name):
    _, _, adapters, fed = _setup()
    train = fed.train._replace(update_scale=fed.train.update_scale.at[2].set(np.nan))
    round_fn = _round(name)
    state, metrics = round_fn(cj.init_server_state(adapters, RN), train, jax.random.key(0))
    assert _state_finite(state) and not bool(metrics.refused)
    assert int(metrics.screened[2]) == screening.NON_FINITE
    assert bool(metrics.flagged[2]) and int(state.flag_counts[2]) == 1
    lines = describe_screening(metrics, state.global_.keys())
    assert len(lines) == 1 and lines[0].startswith("client 2: non-finite")


@pytest.mark.parametrize("name", ["fedit", pytest.param("clair", marks=pytest.mark.slow)])
def test_a_scaled_client_does_not_poison_later_rounds(name):
    # update_scale=1e9 every round: screened out every round, its next adapter is
    # the global one (not its own ~1e7 adapter), and no later round fails.
    _, _, adapters, fed = _setup()
    train = fed.train._replace(update_scale=fed.train.update_scale.at[4].set(1e9))
    round_fn = _round(name)
    state = cj.init_server_state(adapters, RN)
    for k in range(3):
        state, metrics = round_fn(state, train, jax.random.key(k))
        assert _state_finite(state) and not bool(metrics.refused)
        assert int(metrics.screened[4]) == screening.NORM_OUTLIER
        for name, g in state.global_.items():
            np.testing.assert_array_equal(state.clients[name].B[4], g.B)
    assert int(state.flag_counts[4]) == 3


def test_out_of_vocabulary_tokens_screen_the_client_out():
    _, _, adapters, fed = _setup()
    round_fn = _round("fedit")
    bad_targets = fed.train._replace(
        targets=fed.train.targets.at[1, 0, 0].set(99), mask=fed.train.mask.at[1, 0, 0].set(1.0)
    )
    bad_inputs = fed.train._replace(inputs=fed.train.inputs.at[5, 0, 0].set(-3))
    for train, client in ((bad_targets, 1), (bad_inputs, 5)):
        state, metrics = round_fn(cj.init_server_state(adapters, RN), train, jax.random.key(0))
        assert _state_finite(state)
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(metrics.screened)), [client])
        assert not np.all(np.isfinite(np.asarray(metrics.local_losses[client])))
    # Outside the round, the loss is strict (an error) unless asked otherwise.
    logits = jnp.zeros((1, 2, 8))
    targets = jnp.array([[1, 9]])
    with pytest.raises(ValueError, match="must hold integers"):
        training.masked_cross_entropy(logits, targets, jnp.ones((1, 2)))
    assert np.isnan(training.masked_cross_entropy(logits, targets, jnp.ones((1, 2)), strict=False))


def test_round_refuses_to_commit_a_non_finite_global_from_any_aggregator():
    # A custom rule (no screening) that returns NaN: the round keeps the previous
    # global adapter, names the client that caused it, and every state is finite.
    def poisoned(clients, global_, weights, round_index, key):
        n = weights.shape[0]
        bad = jax.tree.map(lambda x: jnp.mean(x, axis=0) * jnp.nan, clients)
        return cj.AggregateResult(clients, bad, jnp.zeros((n,), bool), {})

    _, _, adapters, fed = _setup()
    train = fed.train._replace(update_scale=fed.train.update_scale.at[0].set(np.inf))
    round_fn = _make(cj.Aggregator("poisoned", poisoned))
    start = cj.init_server_state(adapters, RN)
    state, metrics = round_fn(start, train, jax.random.key(0))
    assert bool(metrics.refused) and _state_finite(state)
    assert np.asarray(metrics.screened).tolist() == [3, 0, 0, 0, 0, 0]
    for name, g in state.global_.items():
        np.testing.assert_array_equal(g.B, start.global_[name].B)
        # client 0's own (non-finite) adapter is replaced by the global one
        np.testing.assert_array_equal(state.clients[name].A[0], g.A)


@pytest.mark.parametrize("factored", [pytest.param(False, marks=pytest.mark.slow), True])
def test_clair_flags_only_the_screened_clients_when_many_are_screened(factored):
    """30% of 20 clients send NaN: CLAIR's statistics run on the others (the screened
    clients are its step-0 exclusions), so no benign client is flagged with them."""
    n, p, q, r = 20, 24, 24, 2
    k = jax.random.split(jax.random.key(3), 4)
    shared = jnp.linalg.qr(jax.random.normal(k[0], (p, r)))[0]
    B = shared[None] @ (jnp.eye(r)[None] + 0.3 * jax.random.normal(k[1], (n, r, r)))
    B = B + 1e-3 * jax.random.normal(k[2], B.shape)
    A = jax.random.normal(k[3], (n, r, q)) / np.sqrt(q)
    bad = np.zeros(n, bool)
    bad[[1, 4, 7, 11, 15, 18]] = True
    B = jnp.where(jnp.asarray(bad)[:, None, None], jnp.nan, B)
    global_ = {"m": cj.LoRAFactors(shared, jnp.zeros((r, q)))}
    rule = cj.clair_aggregator(server_math="factored" if factored else "dense")
    res = rule.aggregate({"m": cj.LoRAFactors(B, A)}, global_, None, 1, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(res.flagged), bad)
    assert np.all(np.isfinite(np.asarray(res.global_["m"].B)))
