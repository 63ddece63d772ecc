"""Sharding: rounds and vmapped solvers split over simulated devices equal one device.

The multi-device checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set
before JAX starts); it has a timeout, so a hang (e.g. the jaxlib 0.10 CPU
LAPACK thread-pool deadlock, see ``clair_jax/_src/linalg/batching.py``) fails the test
instead of blocking. 20 clients on 8 devices by default (FedIT with 7 participants and a
vmapped solve; 8 does not divide 20: the round pads the client axis), every case (CLAIR
too) on every count from 1 to 8 with ``-m slow``.
The bad-input checks run in-process on whatever devices this process has.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clair_jax as cj
from tests.subprocess_json import run_json

CLIENTS = 20
ATOL = 1e-5

SCRIPT = r"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import clair_jax as cj

devices, n, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
assert len(jax.devices()) == devices, jax.devices()
config = cj.TransformerConfig(vocab_size=32, max_len=16, num_layers=1, width=16, num_heads=2,
                              mlp_width=16, lora_rank=4, lora_targets=("query", "value"))
graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
fed = cj.data.make_federation(
    jax.random.key(1), cj.data.FederationConfig(num_clients=n, length=8, train_examples=6))
state = cj.init_server_state(adapters, n)
mesh = cj.client_mesh()
out = {}


def max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float)))) for x, y in pairs)


# name: (aggregator, participation); fedit runs a second round from the sharded state.
cases = {"fedit": (cj.fedit(), None), "clair": (cj.clair_aggregator(offset=True), None),
         "fedit_partial": (cj.fedit(), 7)}
for name in [name for name in names if name in cases]:
    aggregator, participation = cases[name]
    kwargs = dict(local_steps=2, batch_size=4, participation=participation)
    key = jax.random.key(0)
    single_fn = cj.make_round(graphdef, base, aggregator, **kwargs)
    sharded_fn = cj.make_sharded_round(graphdef, base, aggregator, mesh, **kwargs)
    single, m1 = single_fn(state, fed.train, key)
    sharded, m2 = sharded_fn(state, fed.train, key)
    again, m3, single2, m4 = sharded, m2, single, m1
    if name != "clair":
        again, m3 = sharded_fn(sharded, fed.train, jax.random.key(5))  # from the sharded state
        single2, m4 = single_fn(single, fed.train, jax.random.key(5))
    per_client = [*jax.tree.leaves(sharded.clients), sharded.flag_counts,
                  sharded.participation_counts]
    out[name] = {
        "state_diff": max(max_diff(single, sharded), max_diff(single2, again)),
        "loss_diff": max(max_diff(m1.local_losses, m2.local_losses),
                         max_diff(m4.local_losses, m3.local_losses)),
        "metrics_shapes_equal": jax.tree.map(np.shape, (m1, m3)) == jax.tree.map(
            np.shape, (m2, m4)),
        "participants_equal": bool(np.array_equal(m1.participants, m2.participants)),
        "flagged_equal": bool(np.array_equal(m1.flagged, m2.flagged)),
        "participation_total": int(np.sum(again.participation_counts)),
        "moved": max_diff(single.clients, state.clients),
        "specs": sorted({str(x.sharding.spec) for x in per_client}),
        "devices": sorted({len(x.sharding.device_set) for x in per_client}),
        "shard_rows": sorted({x.addressable_shards[0].data.shape[0] for x in per_client}),
        "global_replicated": all(x.sharding.is_fully_replicated
                                 for x in jax.tree.leaves(sharded.global_)),
    }

if "decompose" in names:
    # A vmapped batch of decompositions, one problem per device (batched CPU LAPACK calls
    # running concurrently on several devices can deadlock with jaxlib 0.10): 10 clients with
    # rank-1 updates in a shared column space; client 3 corrupted.
    m = devices
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    updates = jnp.einsum("mpr,mnrq->mnpq", jax.random.normal(k1, (m, 6, 1)),
                         jax.random.normal(k2, (m, 10, 1, 5)))
    updates = updates.at[:, 3].add(3.0 * jax.random.normal(k3, (m, 6, 5)))
    solve = jax.jit(jax.vmap(lambda u: cj.decompose(u, lam_nuc=1.0, lam_block=1.0)))
    plain = solve(updates)
    split = solve(cj.shard_batch(updates, mesh))
    out["decompose"] = {
        "diff": max_diff((plain.low_rank, plain.sparse), (split.low_rank, split.sparse)),
        "iters_equal": bool(np.array_equal(plain.num_iters, split.num_iters)),
        "flagged": np.argwhere(np.linalg.norm(np.asarray(split.sparse), axis=(2, 3)) > 0).tolist(),
        "specs": sorted({str(x.sharding.spec) for x in (split.low_rank, split.sparse)}),
        "devices": len(split.low_rank.sharding.device_set),
    }

# A run checkpoint of a state split over the devices comes back split the same way.
import tempfile
from clair_jax._src.federated.run_checkpoint import RunCheckpoint

split_state = cj.shard_clients(cj.init_server_state(adapters, 2 * devices), mesh)
split_state = split_state._replace(flag_counts=split_state.flag_counts + 3)
with tempfile.TemporaryDirectory() as where:
    with RunCheckpoint(where) as store:
        store.save(split_state, [], {"identity": "test", "first_round": 0})
    back = cj.load_checkpoint(where, like=split_state)
out["restored"] = {
    "equal": max_diff(back, split_state) == 0.0,
    "specs_equal": jax.tree.map(lambda x: str(x.sharding.spec), back)
    == jax.tree.map(lambda x: str(x.sharding.spec), split_state),
    "flag_spec": str(back.flag_counts.sharding.spec),
}
try:
    cj.shard_batch(jnp.zeros((devices + 1, 3, 2)), mesh)
    out["batch_error"] = None
except ValueError as err:
    out["batch_error"] = str(err)
print(json.dumps(out))
"""


ALL = ("fedit", "clair", "fedit_partial", "decompose")
#: The cases the default suite runs per device count (the slow sweep runs ALL, CLAIR's
#: sharded round included).
DEFAULT = {8: ("fedit_partial", "decompose")}


def run_on(devices: int, names=ALL) -> dict:
    """Runs SCRIPT's ``names`` with ``devices`` simulated CPU devices; returns its JSON."""
    return run_json(
        SCRIPT,
        str(devices),
        str(CLIENTS),
        ",".join(names),
        xla_devices=devices,
        env={"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")},
    )


@pytest.fixture(scope="module", params=[8])
def devices(request):
    return request.param, run_on(request.param, DEFAULT[request.param])


def check_run(devices: int, out: dict) -> None:
    even = CLIENTS % devices == 0
    for name in {"fedit", "clair", "fedit_partial"} & set(out):
        r = out[name]
        # The sharded round equals the single-device round, also from a sharded state.
        assert r["state_diff"] <= ATOL, (name, r)
        assert r["loss_diff"] <= ATOL, (name, r)
        assert r["flagged_equal"] and r["participants_equal"], (name, r)
        assert r["metrics_shapes_equal"], (name, r)  # padded clients never reach the metrics
        assert r["moved"] > 100 * ATOL, (name, r)  # the round did change the adapters
        assert r["global_replicated"], (name, r)
        k = 7 if name == "fedit_partial" else CLIENTS
        rounds = 1 if name == "clair" else 2
        assert r["participation_total"] == rounds * k, (name, r)  # padding is never counted
        if devices == 1:  # one piece: P() and P("clients") are the same placement
            assert r["devices"] == [1] and r["shard_rows"] == [CLIENTS], (name, r)
        elif even:  # split into equal pieces
            assert r["specs"] == ["P('clients',)"] and r["devices"] == [devices], (name, r)
            assert r["shard_rows"] == [CLIENTS // devices], (name, r)
        else:  # no equal pieces: the state is replicated, the training padded and split
            assert r["specs"] == ["P()"] and r["shard_rows"] == [CLIENTS], (name, r)
    assert out["restored"] == {"equal": True, "specs_equal": True, "flag_spec": "P('clients',)"}
    r = out.get("decompose", {})
    if r:
        assert r["diff"] <= ATOL and r["iters_equal"], r
        assert r["flagged"] == [[m, 3] for m in range(devices)], r  # client 3, in every module
        assert r["specs"] == ["P('clients',)"] and r["devices"] == devices, r
    if devices > 1:
        assert f"the batch size ({devices + 1}) must be divisible by the size ({devices})" in (
            out["batch_error"] or ""
        )


def test_sharded_rounds_equal_the_single_device_round(devices):
    check_run(*devices)


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 2, 4, 5, 6, 7, 8])
def test_sharded_rounds_on_every_device_count(count):
    check_run(count, run_on(count))


# --- in-process: one device, placement rules and bad input ----------------------------------


@pytest.fixture
def mesh():
    return cj.client_mesh()


def small_state(n=4):
    # global_ has a leading axis of length n too: it must still be replicated.
    adapters = {"w": cj.LoRAFactors(B=jnp.ones((n, 2)), A=jnp.ones((2, 3)))}
    return cj.init_server_state(adapters, n)


def test_server_state_placement(mesh):
    state = cj.shard_clients(small_state(), mesh)
    split = P("clients") if 4 % mesh.size == 0 else P()  # equal pieces only
    assert state.clients["w"].B.sharding.spec == split
    assert state.flag_counts.sharding.spec == split
    assert state.global_["w"].B.sharding.spec == P()
    assert state.round.sharding.spec == P()
    np.testing.assert_array_equal(state.clients["w"].B, np.ones((4, 4, 2)))


def test_num_clients_selects_the_split_leaves(mesh):
    tree = {"stacked": jnp.zeros((4, 3)), "other": jnp.zeros((3, 4)), "scalar": jnp.float32(1)}
    placed = cj.shard_clients(tree, mesh, num_clients=4)
    assert placed["stacked"].sharding.spec == (P("clients") if 4 % mesh.size == 0 else P())
    assert placed["other"].sharding.spec == P()
    assert placed["scalar"].sharding.spec == P()


def test_shard_batch_and_replicate(mesh):
    m = 2 * mesh.size
    x = cj.shard_batch({"a": jnp.ones((m, 3)), "b": jnp.zeros((m,))}, mesh)
    assert x["a"].sharding.spec == P("clients") and x["b"].sharding.spec == P("clients")
    assert cj.replicate(jnp.ones(3), mesh).sharding.is_fully_replicated


def test_client_mesh_and_sharding():
    mesh = cj.client_mesh(axis_name="c")
    assert mesh.axis_names == ("c",) and mesh.size == len(jax.devices())
    assert cj.client_sharding(mesh) == NamedSharding(mesh, P("c"))


def test_two_axis_mesh_needs_an_axis_name():
    mesh2d = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "clients"))
    with pytest.raises(ValueError, match="pass axis_name"):
        cj.shard_clients(jnp.zeros((4, 2)), mesh2d)
    placed = cj.shard_clients(jnp.zeros((4, 2)), mesh2d, axis_name="clients")
    assert placed.sharding.spec == P("clients")


def test_bad_input(mesh):
    with pytest.raises(ValueError, match="devices must not be empty"):
        cj.client_mesh([])
    with pytest.raises(ValueError, match="must not repeat"):
        cj.client_mesh([jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="axis_name must be a non-empty string"):
        cj.client_mesh(axis_name="")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        cj.shard_clients(jnp.zeros((4, 2)), "cpu")
    with pytest.raises(ValueError, match=r"axis_name 'batch' is not an axis of the mesh"):
        cj.shard_batch(jnp.zeros((4, 2)), mesh, axis_name="batch")
    with pytest.raises(ValueError, match=r"cannot infer the client axis.*\(3,\), \(4, 2\)"):
        cj.shard_clients({"a": jnp.zeros((4, 2)), "b": jnp.zeros(3)}, mesh)
    with pytest.raises(ValueError, match="no leaf has a leading axis of length num_clients=5"):
        cj.shard_clients({"a": jnp.zeros((4, 2))}, mesh, num_clients=5)
    with pytest.raises(ValueError, match=r"num_clients \(3\) differs .* \(4, flag_counts \(4,\)\)"):
        cj.shard_clients(small_state(4), mesh, num_clients=3)
    with pytest.raises(TypeError, match="num_clients must be an int"):
        cj.shard_clients({"a": jnp.zeros((4, 2))}, mesh, num_clients=4.0)
    with pytest.raises(ValueError, match="same leading"):
        cj.shard_batch({"a": jnp.zeros((4, 2)), "b": jnp.zeros((3,))}, mesh)
    with pytest.raises(ValueError, match="same leading"):
        cj.shard_batch({"a": jnp.zeros((4, 2)), "b": jnp.float32(0)}, mesh)


def test_round_builders_reject_bad_options(mesh):
    from flax import nnx

    config = cj.TransformerConfig(
        vocab_size=8, max_len=6, width=8, num_heads=2, mlp_width=8, num_layers=1, lora_rank=2
    )
    graphdef, base, _ = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs client_map='vmap'"):
        cj.make_sharded_round(graphdef, base, cj.fedit(), mesh, client_map="loop")
    with pytest.raises(ValueError, match="client_sharding is set by make_sharded_round"):
        cj.make_sharded_round(
            graphdef, base, cj.fedit(), mesh, client_sharding=cj.client_sharding(mesh)
        )
    with pytest.raises(ValueError, match="client_sharding needs client_map='vmap'"):
        cj.make_round(
            graphdef,
            base,
            cj.fedit(),
            client_map="loop",
            client_sharding=cj.client_sharding(mesh),
        )
