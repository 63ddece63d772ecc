"""The Flower bridge: serialization, the strategy on hand-made replies, and the example app
run by Flower's simulation runtime against the in-process round."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import clair_jax as cj  # noqa: E402
from clair_jax import flower as cjf  # noqa: E402

N = 4
MODULES = {"blocks/0/attn/value": (5, 2, 3), "head": (3, 2, 6)}  # (p, r, q)


def adapter(seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 2 * len(MODULES))
    out = {}
    for j, (name, (p, r, q)) in enumerate(MODULES.items()):
        out[name] = cj.LoRAFactors(
            B=jax.random.normal(keys[2 * j], (p, r)).astype(dtype),
            A=jax.random.normal(keys[2 * j + 1], (r, q)).astype(dtype),
        )
    return out


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


class FakeGrid:
    """What the strategy asks of a Grid: the connected nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture
def identity():
    """Messages need a task identity (Flower sets it in its processes)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def reply(msg, adapters, *, slot, weight=3.0):
    metrics = MetricRecord({"num-examples": weight, "partition-id": slot})
    content = RecordDict({"arrays": cjf.adapters_to_arrays(adapters), "metrics": metrics})
    return Message(content, reply_to=msg)


def error_reply(msg):
    return Message(Error(code=1, reason="client crashed"), reply_to=msg)


def received(msg):
    return cjf.arrays_to_adapters(msg.content.array_records["arrays"])


def start_round(strategy, server_round, node_ids, initial):
    msgs = list(
        strategy.configure_train(
            server_round,
            cjf.adapters_to_arrays(initial),
            flwr.app.ConfigRecord(),
            FakeGrid(node_ids),
        )
    )
    return {m.metadata.dst_node_id: m for m in msgs}


# --- serialization -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_adapters_round_trip_bit_exact_with_names_and_dtypes(dtype):
    a = adapter(0, dtype)
    record = cjf.adapters_to_arrays(a)
    assert list(record) == ["blocks/0/attn/value/B", "blocks/0/attn/value/A", "head/B", "head/A"]
    back = cjf.arrays_to_adapters(record, like=a)
    assert list(back) == list(a)
    for name in a:
        for got, want in zip(back[name], a[name], strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            bits = np.dtype(f"u{want.dtype.itemsize}")
            np.testing.assert_array_equal(got.view(bits), np.asarray(want).view(bits))


def test_arrays_to_adapters_rejects_what_does_not_fit():
    a = adapter(0)
    record = cjf.adapters_to_arrays(a)
    with pytest.raises(ValueError, match=r"module 'head' factor A: got float32\[2, 6\], expected "):
        cjf.arrays_to_adapters(
            record, like={**a, "head": cj.LoRAFactors(a["head"].B, a["head"].A.T)}
        )
    with pytest.raises(ValueError, match="adapter modules"):
        cjf.arrays_to_adapters(record, like={"head": a["head"]})
    del record["head/A"]
    with pytest.raises(ValueError, match=r"module 'head' has factors \['B'\]"):
        cjf.arrays_to_adapters(record)
    record["weights"] = record["head/B"]
    with pytest.raises(ValueError, match="'weights' is not '<module>/B'"):
        cjf.arrays_to_adapters(record)
    with pytest.raises(TypeError, match="mapping of module names"):
        cjf.adapters_to_arrays([1, 2])


# --- the strategy on hand-made replies ---------------------------------------------------


def test_strategy_rejects_bad_arguments():
    with pytest.raises(TypeError, match="aggregator must be an Aggregator"):
        cjf.AdapterStrategy(lambda *a: a, num_clients=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_clients"):
        cjf.AdapterStrategy(cj.fedit(), num_clients=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="fraction_train must be in"):
        cjf.AdapterStrategy(cj.fedit(), num_clients=3, key=jax.random.key(0), fraction_train=2)


def test_fedit_round_with_failed_invalid_and_missing_replies(identity):
    initial = adapter(0)
    strategy = cjf.AdapterStrategy(cj.fedit(), num_clients=N, key=jax.random.key(3))
    nodes = [11, 22, 33, 44]
    sent = start_round(strategy, 1, nodes, initial)
    assert sorted(sent) == nodes
    for m in sent.values():  # everybody starts from the initial adapter, with the round's key
        jax.tree.map(np.testing.assert_array_equal, received(m), as_numpy(initial))
        config = m.content.config_records["config"]
        assert config["server-round"] == 1
        k_train = jax.random.split(jax.random.fold_in(jax.random.key(3), 0), 3)[1]
        assert config["train-key"] == np.asarray(jax.random.key_data(k_train)).tolist()
        assert config["train-key-impl"] == "threefry2x32"
    trained = {i: adapter(10 + i) for i in range(N)}
    replies = [
        reply(sent[11], trained[0], slot=0, weight=1.0),
        reply(sent[22], trained[1], slot=1, weight=3.0),
        error_reply(sent[33]),
        reply(sent[44], trained[3], slot=3, weight=0.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # FedIT: the weighted mean of the factors over the valid replies (a zero weight counts
    # as a reply that moves nothing).
    expected = jax.tree.map(
        lambda a, b: (1 * np.asarray(a) + 3 * np.asarray(b)) / 4, trained[0], trained[1]
    )
    got = cjf.arrays_to_adapters(arrays)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), got, expected)
    assert (metrics["num-replies"], metrics["num-failed"], metrics["num-missing"]) == (3, 1, 0)
    assert strategy.history[-1]["replied"].tolist() == [True, True, False, True]
    assert strategy.state.participation_counts.tolist() == [1, 1, 0, 1]
    # A broadcast rule: every slot, the failed one too, holds the new global adapter.
    for i in range(N):
        jax.tree.map(
            lambda c, g, i=i: np.testing.assert_array_equal(c[i], g), strategy.state.clients, got
        )
    assert strategy.num_traces == 1

    # Round 2: one shape that does not fit, one slot claimed twice, one node silent.
    sent = start_round(strategy, 2, nodes, initial)
    wrong = {
        **trained[0],
        "head": cj.LoRAFactors(trained[0]["head"].B[:, :1], trained[0]["head"].A[:1]),
    }
    replies = [
        reply(sent[11], trained[2], slot=0),
        reply(sent[22], wrong, slot=1),
        reply(sent[33], trained[3], slot=0),
    ]
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert (metrics["num-replies"], metrics["num-invalid"], metrics["num-missing"]) == (1, 2, 1)
    jax.tree.map(np.testing.assert_allclose, cjf.arrays_to_adapters(arrays), as_numpy(trained[2]))
    # Padded to N rows: 3 then 1 valid replies, one compilation.
    assert strategy.num_traces == 1


def test_no_valid_reply_keeps_the_global_adapter(identity):
    strategy = cjf.AdapterStrategy(cj.fedit(), num_clients=2, key=jax.random.key(0))
    sent = start_round(strategy, 1, [1, 2], adapter(0))
    nan = jax.tree.map(lambda x: x * jnp.nan, adapter(1))
    arrays, metrics = strategy.aggregate_train(
        1, [error_reply(sent[1]), reply(sent[2], nan, slot=1)]
    )
    assert arrays is None and (metrics["num-failed"], metrics["num-invalid"]) == (1, 1)
    assert int(strategy.state.round) == 0 and strategy.num_traces == 0


@pytest.mark.slow
def test_unpadded_aggregation_compiles_per_reply_count(identity):
    strategy = cjf.AdapterStrategy(cj.fedit(), num_clients=N, key=jax.random.key(0), pad=False)
    for server_round, count in ((1, 4), (2, 3), (3, 4)):
        sent = start_round(strategy, server_round, [1, 2, 3, 4], adapter(0))
        strategy.aggregate_train(
            server_round, [reply(sent[i + 1], adapter(i), slot=i) for i in range(count)]
        )
    assert strategy.num_traces == 2


def test_median_and_krum_match_their_definitions(identity):
    trained = [adapter(20 + i) for i in range(5)]
    rows = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in trained])
    for rule, expected_row in (
        (cj.coordinate_median(), np.median(rows, axis=0)),
        (cj.krum(1), None),
    ):
        strategy = cjf.AdapterStrategy(rule, num_clients=5, key=jax.random.key(0))
        sent = start_round(strategy, 1, range(5), adapter(0))
        arrays, _ = strategy.aggregate_train(
            1, [reply(sent[i], trained[i], slot=i) for i in range(5)]
        )
        got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(cjf.arrays_to_adapters(arrays))])
        if expected_row is None:  # Krum: the row with the smallest sum over its n - f - 2 nearest
            d = ((rows[:, None] - rows[None]) ** 2).sum(-1)
            scores = np.sort(d, axis=1)[:, 1 : 5 - 1 - 2 + 1].sum(1)
            expected_row = rows[np.argmin(scores)]
        np.testing.assert_allclose(got, expected_row, rtol=1e-5, atol=1e-6)


def test_personalised_adapters_go_back_to_their_nodes(identity):
    # Local-only keeps each client's adapter: the next round sends node k its own, by slot,
    # whatever the node ids; a node that never replied gets the global adapter.
    strategy = cjf.AdapterStrategy(cj.local_only(), num_clients=3, key=jax.random.key(0))
    initial = adapter(0)
    sent = start_round(strategy, 1, [905, 17, 400], initial)
    trained = {905: adapter(1), 17: adapter(2)}
    strategy.aggregate_train(
        1, [reply(sent[905], trained[905], slot=2), reply(sent[17], trained[17], slot=0)]
    )
    assert strategy.slots == {905: 2, 17: 0}
    sent = start_round(strategy, 2, [905, 17, 400], initial)
    for node, want in (*trained.items(), (400, strategy.state.global_)):
        jax.tree.map(np.testing.assert_array_equal, received(sent[node]), as_numpy(want))


# --- the example app under Flower's simulation runtime -----------------------------------


def _run_example_app(tmp_path, monkeypatch, overrides):
    """The example app in Flower's simulation runtime, then the same run with make_round
    and run_rounds in-process, compared round by round: returns ``(strategy, run, cfg,
    LAST_RUN)``."""
    pytest.importorskip("ray")  # the simulation runtime's backend (flwr[simulation])
    from flwr.simulation import run_simulation

    from clair_jax.flower.example import client_app, server_app, task

    monkeypatch.setenv("CLAIR_JAX_CACHE", str(tmp_path))  # the nodes load the base from here
    overrides = {"fraction-evaluate": 0.0, "wait-timeout": 120.0, **overrides}  # fail, not hang
    cfg = task.settings(overrides)
    run = task.task(cfg)  # pre-trains the base once, before the nodes start
    run_simulation(
        server_app.make_server_app(overrides),
        client_app.make_client_app(overrides),
        num_supernodes=cfg["num-clients"],
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    strategy = server_app.LAST_RUN["strategy"]
    assert all(h["replied"].all() for h in strategy.history)
    assert strategy.num_traces == 1
    round_fn = cj.make_round(
        run.graphdef,
        run.base,
        task.aggregator(cfg),
        local_steps=cfg["local-steps"],
        batch_size=cfg["batch-size"],
        optimizer=run.optimizer,
        client_map="loop",
    )
    state, history = cj.run_rounds(
        round_fn,
        cj.init_server_state(run.adapters, cfg["num-clients"]),
        run.federation.train,
        jax.random.key(cfg["seed"]),
        cfg["num-rounds"],
        progress=False,
    )
    assert len(strategy.history) == len(history) == cfg["num-rounds"]
    for got, want in zip(strategy.history, history, strict=True):
        np.testing.assert_array_equal(got["flagged"], np.asarray(want.flagged))
    # Float tolerance: the nodes train one client per call, make_round's loop in its own
    # jitted functions, and CLAIR's iterations carry the rounding through the rounds.
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)  # noqa: E731
    jax.tree.map(close, strategy.state.global_, state.global_)
    jax.tree.map(close, strategy.state.clients, state.clients)
    np.testing.assert_array_equal(strategy.state.flag_counts, state.flag_counts)
    return strategy, run, cfg, server_app.LAST_RUN


# Ray starts its processes with subprocess (fork + exec), which JAX warns about, leaves
# /dev/null handles open and announces a change of its GPU defaults; as errors these warnings
# would stop the simulation runtime.
_RAY_WARNINGS = (
    "ignore:os.fork:RuntimeWarning",
    "ignore::ResourceWarning",
    "ignore:Tip. In future versions of Ray:FutureWarning",
)


@pytest.mark.filterwarnings(*_RAY_WARNINGS)
@pytest.mark.slow
def test_example_app_with_fedit_matches_make_round(tmp_path, monkeypatch):
    """4 nodes x 2 rounds of FedIT in Flower's simulation runtime (messages, Ray workers,
    serialisation, padding): the same global and client adapters as make_round."""
    _run_example_app(
        tmp_path,
        monkeypatch,
        {"num-clients": 4, "num-rounds": 2, "aggregator": "fedit", "pretrain-steps": 50},
    )


@pytest.mark.slow
@pytest.mark.filterwarnings(*_RAY_WARNINGS)
def test_example_app_flags_the_contaminated_and_matches_make_round(tmp_path, monkeypatch):
    """8 nodes (2 contaminated) x 3 rounds of CLAIR in Flower's simulation runtime: the
    final round flags exactly the contaminated nodes, and every round's flags, the global
    adapter and each client's refined adapter are those of the in-process round."""
    strategy, run, cfg, last = _run_example_app(tmp_path, monkeypatch, {})
    assert (cfg["num-clients"], cfg["num-rounds"]) == (8, 3)
    truth = np.asarray(run.federation.contaminated)
    assert truth.sum() == 2
    np.testing.assert_array_equal(strategy.history[-1]["flagged"], truth)
    assert last["detection"]["f1"] == 1.0


@pytest.mark.parametrize(
    "rule",
    [
        cj.fedit,
        pytest.param(cj.flexlora, marks=pytest.mark.slow),
        pytest.param(lambda: cj.fedrot(0.4), marks=pytest.mark.slow),
    ],
)
def test_padding_is_exact_for_the_weighted_rules(identity, rule):
    # A failed node: padded (its zero-weight row holds its start) or not, the same round.
    globals_ = []
    for pad in (True, False):
        strategy = cjf.AdapterStrategy(rule(), num_clients=N, key=jax.random.key(0), pad=pad)
        sent = start_round(strategy, 1, [1, 2, 3, 4], adapter(0))
        replies = [reply(sent[i + 1], adapter(30 + i), slot=i, weight=i + 1.0) for i in range(3)]
        arrays, _ = strategy.aggregate_train(1, [*replies, error_reply(sent[4])])
        globals_.append(cjf.arrays_to_adapters(arrays))
    for name in MODULES:  # the update B A (FlexLoRA's factors are defined up to signs)
        padded, exact = (g[name].B @ g[name].A for g in globals_)
        np.testing.assert_allclose(padded, exact, rtol=1e-5, atol=1e-5)
