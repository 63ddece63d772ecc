"""Federated rounds: jit == no-jit == Python loop, keys, participation, attacks.

Checkpoints and run_rounds' resume are tested in test_checkpoint.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clair_jax as cj
from clair_jax import data
from clair_jax._src.federated import state as state_lib
from clair_jax._src.federated import training

N = 6
CONFIG = cj.TransformerConfig(
    vocab_size=8, max_len=6, num_layers=1, width=8, num_heads=2, mlp_width=8, lora_rank=2
)
FED = data.FederationConfig(
    num_clients=N,
    contaminated_fraction=0.0,
    vocab_size=8,
    length=3,
    train_examples=4,
    test_examples=5,
    shared_tokens=2,
    specific_tokens=1,
)


@functools.cache
def _round(name, participation=None, client_map="vmap", jit=True):
    graphdef, base, _, _ = _setup_cache()
    aggregator = {"fedit": cj.fedit, "local_only": cj.local_only, "ffa_lora": cj.ffa_lora}[name]()
    return cj.make_round(
        graphdef,
        base,
        aggregator,
        local_steps=2,
        batch_size=3,
        optimizer=optax.adam(0.05),
        participation=participation,
        client_map=client_map,
        jit=jit,
    )


@functools.lru_cache(maxsize=1)
def _setup_cache():
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(CONFIG, rngs=nnx.Rngs(0)))
    fed = data.make_federation(jax.random.key(1), FED)
    return graphdef, base, adapters, fed


@pytest.fixture
def parts():
    return _setup_cache()


def trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def state_after(round_fn, adapters, train, keys):
    state = cj.init_server_state(adapters, N)
    for k in keys:
        state, metrics = round_fn(state, train, jax.random.key(k))
    return state, metrics


# --- transforms and keys -----------------------------------------------------------------


@pytest.mark.slow
def test_jit_matches_no_jit_and_python_loop(parts):
    _, _, adapters, fed = parts
    jitted, _ = state_after(_round("fedit"), adapters, fed.train, [0, 1])
    eager, _ = state_after(_round("fedit", jit=False), adapters, fed.train, [0, 1])
    looped, metrics = state_after(_round("fedit", client_map="loop"), adapters, fed.train, [0, 1])
    for other in (eager, looped):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), jitted, other
        )
    assert int(jitted.round) == 2 and metrics.local_losses.shape == (N, 2)
    # The adapters moved away from their initial value.
    assert not trees_equal(jitted.global_, adapters)


def test_round_is_a_function_of_the_key(parts):
    _, _, adapters, fed = parts
    round_fn = _round("fedit")
    a, _ = state_after(round_fn, adapters, fed.train, [3])
    b, _ = state_after(round_fn, adapters, fed.train, [3])
    c, _ = state_after(round_fn, adapters, fed.train, [4])
    assert trees_equal(a, b)
    assert not trees_equal(a.global_, c.global_)


def test_fedit_round_averages_the_local_updates(parts):
    # Same start, same key: FedIT's global adapter is the weighted mean of the adapters
    # local-only training leaves on the clients, and every client gets it back.
    _, _, adapters, fed = parts
    train = fed.train._replace(weight=jnp.arange(1.0, N + 1.0))
    local, _ = state_after(_round("local_only"), adapters, train, [7])
    fedit, _ = state_after(_round("fedit"), adapters, train, [7])
    p = np.arange(1.0, N + 1.0) / np.sum(np.arange(1.0, N + 1.0))
    for name, f in local.clients.items():
        for factor in ("B", "A"):
            mean = np.einsum("n,n...->...", p, np.asarray(getattr(f, factor)))
            np.testing.assert_allclose(getattr(fedit.global_[name], factor), mean, atol=1e-6)
            np.testing.assert_array_equal(
                getattr(fedit.clients[name], factor),
                np.broadcast_to(getattr(fedit.global_[name], factor), (N, *mean.shape)),
            )


# --- local training ----------------------------------------------------------------------


def test_local_train_sgd_step_is_the_gradient_step(parts):
    graphdef, base, adapters, fed = parts
    x, y, w = fed.train.inputs[0], fed.train.targets[0], fed.train.mask[0]
    start = jax.tree.map(lambda a: a + 0.1, adapters)  # B != 0 so every factor gets a gradient
    trained, losses = cj.local_train(
        graphdef,
        base,
        start,
        x,
        y,
        w,
        jax.random.key(0),
        optimizer=optax.sgd(0.5),
        steps=1,
        batch_size=100,  # more than m: the full local data set
    )

    def loss(adapters):  # written independently, through the NNX model
        model = cj.merge_lora(graphdef, base, adapters)
        ce = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
        return jnp.sum(w * ce) / jnp.sum(w)

    value, grads = jax.value_and_grad(loss)(start)
    np.testing.assert_allclose(losses[0], value, rtol=1e-6)
    expected = jax.tree.map(lambda a, g: a - 0.5 * g, start, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), trained, expected)


def test_local_train_reduces_the_loss_and_honours_the_frozen_factor(parts):
    graphdef, base, adapters, fed = parts
    args = (fed.train.inputs[1], fed.train.targets[1], fed.train.mask[1], jax.random.key(2))
    kwargs = dict(optimizer=optax.adam(0.05), steps=25, batch_size=4)
    trained, losses = cj.local_train(graphdef, base, adapters, *args, **kwargs)
    # From PEFT's initialisation (B = 0) 25 Adam steps take the loss from 1.98 to 1.12.
    assert float(losses[-1]) < 0.7 * float(losses[0])
    frozen, _ = cj.local_train(graphdef, base, adapters, *args, frozen_factor="A", **kwargs)
    for name, f in frozen.items():
        np.testing.assert_array_equal(f.A, adapters[name].A)
        assert np.any(np.asarray(f.B) != np.asarray(adapters[name].B))


def test_ffa_round_never_changes_the_down_projection_A(parts):
    """FFA-LoRA as its paper: the random down-projection A (lora_A) frozen, the zero B trained."""
    _, _, adapters, fed = parts
    state, _ = state_after(_round("ffa_lora"), adapters, fed.train, [0, 1])
    for name, f in state.clients.items():
        assert np.any(np.asarray(adapters[name].A) != 0) and not np.any(adapters[name].B)
        np.testing.assert_array_equal(f.A, np.broadcast_to(adapters[name].A, f.A.shape))
        assert np.any(np.asarray(f.B) != 0)


# --- participation and attacks -----------------------------------------------------------


@pytest.mark.slow
def test_partial_participation(parts):
    _, _, adapters, fed = parts
    state0 = cj.init_server_state(adapters, N)
    # Personalised rule: non-participants keep their adapter bit for bit.
    local = _round("local_only", participation=3)
    seen = set()
    state = state0
    for k in range(4):
        new, metrics = local(state, fed.train, jax.random.key(k))
        idx = np.asarray(metrics.participants)
        assert len(set(idx)) == 3 and list(idx) == sorted(idx)
        seen.add(tuple(idx))
        others = np.setdiff1d(np.arange(N), idx)
        for name in adapters:
            kept = new.clients[name].B[others]
            np.testing.assert_array_equal(kept, state.clients[name].B[others])
            assert np.any(np.asarray(new.clients[name].B[idx]) != 0)
        assert metrics.local_losses.shape == (3, 2)
        state = new
    assert len(seen) > 1  # different keys sample different subsets
    np.testing.assert_array_equal(state.participation_counts.sum(), 12)
    # Broadcast rule: everybody, participant or not, gets the new global adapter.
    new, metrics = _round("fedit", participation=2)(state0, fed.train, jax.random.key(9))
    for name, f in new.clients.items():
        np.testing.assert_array_equal(f.B, np.broadcast_to(new.global_[name].B, f.B.shape))
    np.testing.assert_array_equal(
        new.participation_counts, np.isin(np.arange(N), np.asarray(metrics.participants))
    )


def test_next_state_updates_participants_and_counters():
    # Hand-made stacks: 4 clients, clients 1 and 3 took part.
    ones = np.ones((4, 3, 2), np.float32)
    state = cj.ServerState(
        round=jnp.asarray(2, jnp.int32),
        global_={"w": cj.LoRAFactors(B=jnp.zeros((3, 2)), A=jnp.zeros((2, 5)))},
        clients={
            "w": cj.LoRAFactors(
                B=jnp.asarray(ones * np.arange(4)[:, None, None]), A=jnp.zeros((4, 2, 5))
            )
        },
        flag_counts=jnp.asarray([0, 1, 0, 2], jnp.int32),
        participation_counts=jnp.asarray([1, 1, 1, 1], jnp.int32),
    )
    idx = jnp.asarray([1, 3], jnp.int32)
    new_global = {"w": cj.LoRAFactors(B=jnp.full((3, 2), 7.0), A=jnp.full((2, 5), 7.0))}
    flagged = jnp.asarray([False, False, False, True])
    personal = {
        "w": cj.LoRAFactors(B=jnp.stack([ones[0] * 10, ones[0] * 30]), A=jnp.ones((2, 2, 5)))
    }
    new = state_lib.next_state(state, idx, personal, new_global, flagged)
    np.testing.assert_array_equal(new.clients["w"].B[:, 0, 0], [0, 10, 2, 30])
    np.testing.assert_array_equal(new.clients["w"].A[:, 0, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(new.flag_counts, [0, 1, 0, 3])
    np.testing.assert_array_equal(new.participation_counts, [1, 2, 1, 2])
    assert int(new.round) == 3 and float(new.global_["w"].B[0, 0]) == 7.0
    # Every participant got the global adapter: a broadcast rule, the others get it too.
    stacked = jax.tree.map(lambda g: jnp.broadcast_to(g, (2, *g.shape)), new_global)
    new = state_lib.next_state(state, idx, stacked, new_global, flagged)
    np.testing.assert_array_equal(new.clients["w"].B, np.full((4, 3, 2), 7.0))


def test_attack_model(parts):
    _, _, adapters, fed = parts
    round_fn = _round("local_only")  # local-only returns what clients sent
    honest, _ = state_after(round_fn, adapters, fed.train, [5])
    scale = jnp.array([1.0, 3.0, -1.0, 1.0, 2.0, 2.0])
    coordinated = jnp.array([False, False, False, False, True, True])
    attacked_data = fed.train._replace(update_scale=scale, coordinated=coordinated)
    attacked, _ = state_after(round_fn, adapters, attacked_data, [5])
    for name, f in honest.clients.items():
        for factor in ("B", "A"):
            start = np.asarray(getattr(adapters[name], factor))
            delta = np.asarray(getattr(f, factor)) - start
            sent = np.asarray(getattr(attacked.clients[name], factor))
            for i in range(4):
                np.testing.assert_allclose(sent[i], start + float(scale[i]) * delta[i], atol=1e-6)
            common = start + 2.0 * (delta[4] + delta[5]) / 2
            np.testing.assert_allclose(sent[4], common, atol=1e-6)
            np.testing.assert_allclose(sent[5], common, atol=1e-6)


# --- evaluation ----------------------------------------------------------------------------


def test_evaluate_clients_against_numpy(parts):
    graphdef, base, adapters, fed = parts
    state, _ = state_after(_round("local_only"), adapters, fed.train, [0])
    ev = cj.evaluate_clients(graphdef, base, state.clients, fed.test)
    for i in range(N):
        client = jax.tree.map(lambda x, i=i: x[i], state.clients)
        logits = np.asarray(cj.apply_lora(graphdef, base, client, fed.test.inputs[i]), np.float64)
        y, w = np.asarray(fed.test.targets[i]), np.asarray(fed.test.mask[i])
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
        np.testing.assert_allclose(ev.loss[i], (w * ce).sum() / w.sum(), rtol=1e-5)
        acc = (w * (logits.argmax(-1) == y)).sum() / w.sum()
        np.testing.assert_allclose(ev.accuracy[i], acc, rtol=1e-6)
    # Loss weights summing to 1/2 per client give the same weighted means.
    light = fed.test._replace(
        mask=fed.test.mask / (2 * fed.test.mask.sum(axis=(1, 2), keepdims=True))
    )
    ev_light = cj.evaluate_clients(graphdef, base, state.clients, light)
    np.testing.assert_allclose(ev_light.accuracy, ev.accuracy, rtol=1e-6)
    np.testing.assert_allclose(ev_light.loss, ev.loss, rtol=1e-6)


# --- bad input -----------------------------------------------------------------------------


def test_bad_local_train_arguments(parts):
    graphdef, base, adapters, fed = parts
    args = (graphdef, base, adapters, fed.train.inputs[0], fed.train.targets[0])
    mask, key = fed.train.mask[0], jax.random.key(0)
    kwargs = dict(optimizer=optax.sgd(0.1), steps=1, batch_size=2)
    with pytest.raises(ValueError, match="frozen_factor must be None, 'A' or 'B', got 'C'"):
        cj.local_train(*args, mask, key, **kwargs, frozen_factor="C")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        cj.local_train(*args, mask, key, **{**kwargs, "batch_size": 0})
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        cj.local_train(*args, mask, key, **{**kwargs, "steps": 0})
    with pytest.raises(ValueError, match=r"mask \(4, 5\)"):
        cj.local_train(*args, mask[:, :5], key, **kwargs)
    with pytest.raises(ValueError, match="aggregator.frozen_factor"):
        cj.make_round(graphdef, base, cj.fedit()._replace(frozen_factor="C"))


def test_bad_round_arguments(parts):
    graphdef, base, adapters, fed = parts
    with pytest.raises(TypeError, match="Aggregator"):
        cj.make_round(graphdef, base, lambda *a: None)
    with pytest.raises(ValueError, match="local_steps"):
        cj.make_round(graphdef, base, cj.fedit(), local_steps=0)
    with pytest.raises(ValueError, match="client_map"):
        cj.make_round(graphdef, base, cj.fedit(), client_map="pmap")
    state = cj.init_server_state(adapters, N)
    too_many = cj.make_round(graphdef, base, cj.fedit(), participation=N + 1)
    with pytest.raises(ValueError, match="participation"):
        too_many(state, fed.train, jax.random.key(0))
    short = jax.tree.map(lambda x: x[: N - 1], fed.train)
    with pytest.raises(ValueError, match="client_data has 5 clients"):
        _round("fedit")(state, short, jax.random.key(0))
    with pytest.raises(ValueError, match="num_clients"):
        cj.init_server_state(adapters, 0)


def test_aggregator_with_uses_start_receives_the_round_start(parts):
    # A rule that discards every round (clients keep their start) leaves the clients
    # where they were; the start it receives is the participants' adapters.
    graphdef, base, adapters, fed = parts
    seen = {}

    def keep_start(clients, global_, weights, round_index, key, start):
        seen["start"] = start
        n = weights.shape[0]
        return cj.AggregateResult(start, global_, jnp.zeros((n,), bool), {})

    rule = cj.Aggregator("keep_start", keep_start, uses_start=True)
    round_fn = cj.make_round(
        graphdef, base, rule, local_steps=2, batch_size=3, participation=4, jit=False
    )
    state = cj.init_server_state(adapters, N)
    state = state._replace(
        clients=jax.tree.map(
            lambda x: x + 0.01 * jnp.arange(N).reshape((N,) + (1,) * (x.ndim - 1)), state.clients
        )
    )
    new_state, metrics = round_fn(state, fed.train, jax.random.key(5))
    assert trees_equal(new_state.clients, state.clients)
    idx = np.asarray(metrics.participants)
    assert trees_equal(seen["start"], jax.tree.map(lambda x: x[idx], state.clients))


def test_masked_cross_entropy_ignores_masked_targets_and_rejects_bad_ones():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, 4, -1], [0, 2, 99]], jnp.int32)  # padding where mask is 0
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    logp = np.asarray(jax.nn.log_softmax(logits))
    expected = -np.mean([logp[0, 0, 1], logp[0, 1, 4], logp[1, 0, 0], logp[1, 1, 2]])
    for fn in (training.masked_cross_entropy, jax.jit(training.masked_cross_entropy)):
        np.testing.assert_allclose(fn(logits, targets, mask), expected, rtol=1e-6)
        # Loss weights of any positive total give the weighted mean (not Σ w CE / 1
        # for totals below 1); an empty mask gives 0.
        for weight in (0.125, 3.0):
            np.testing.assert_allclose(fn(logits, targets, weight * mask), expected, rtol=1e-6)
        uneven = jnp.array([[0.1, 0.3, 0.0], [0.0, 0.2, 0.0]])
        weighted = (0.1 * logp[0, 0, 1] + 0.3 * logp[0, 1, 4] + 0.2 * logp[1, 1, 2]) / -0.6
        np.testing.assert_allclose(fn(logits, targets, uneven), weighted, rtol=1e-6)
        assert fn(logits, targets, jnp.zeros((2, 3))) == 0.0
    with pytest.raises(
        ValueError, match=r"targets \(where mask != 0\) must hold integers in \[0, 5\)"
    ):
        training.masked_cross_entropy(logits, targets, jnp.ones((2, 3)))
    with pytest.raises(Exception, match=r"must hold integers in \[0, 5\)"):
        jax.block_until_ready(
            jax.jit(training.masked_cross_entropy)(logits, targets, jnp.ones((2, 3)))
        )
