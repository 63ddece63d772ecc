"""Sharding: rounds and vmapped solvers split over 8 simulated devices equal one device.

The multi-device checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX starts); it has a timeout, so a hang (e.g. the jaxlib 0.10 CPU
LAPACK thread-pool deadlock, see ``clair_jax/_src/linalg/batching.py``) fails the test
instead of blocking. The bad-input checks run in-process on one device.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import clair_jax as cj

DEVICES = 8
ATOL = 1e-5

SCRIPT = r"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import clair_jax as cj

assert len(jax.devices()) == 8, jax.devices()
config = cj.TransformerConfig(vocab_size=32, max_len=16, num_layers=1, width=16, num_heads=2,
                              mlp_width=16, lora_rank=4, lora_targets=("query", "value"))
graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
fed = cj.data.make_federation(
    jax.random.key(1), cj.data.FederationConfig(num_clients=16, length=8, train_examples=6))
state = cj.init_server_state(adapters, 16)
mesh = cj.client_mesh()
out = {}


def max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float)))) for x, y in pairs)


for name, aggregator in [("fedit", cj.fedit()), ("clair", cj.clair_aggregator(offset=True))]:
    kwargs = dict(local_steps=2, batch_size=4)
    key = jax.random.key(0)
    single, m1 = cj.make_round(graphdef, base, aggregator, **kwargs)(state, fed.train, key)
    sharded, m2 = cj.make_sharded_round(graphdef, base, aggregator, mesh, **kwargs)(
        state, fed.train, key)
    per_client = [*jax.tree.leaves(sharded.clients), sharded.flag_counts,
                  sharded.participation_counts, m2.local_losses]
    out[name] = {
        "state_diff": max_diff(single, sharded),
        "loss_diff": max_diff(m1.local_losses, m2.local_losses),
        "flagged_equal": bool(np.array_equal(m1.flagged, m2.flagged)),
        "moved": max_diff(single.clients, state.clients),
        "specs": sorted({str(x.sharding.spec) for x in per_client}),
        "devices": sorted({len(x.sharding.device_set) for x in per_client}),
        "shard_rows": sorted({x.addressable_shards[0].data.shape[0] for x in per_client}),
        "global_replicated": all(x.sharding.is_fully_replicated
                                 for x in jax.tree.leaves(sharded.global_)),
    }

# A vmapped batch of decompositions (one problem per device: batched CPU LAPACK
# calls running concurrently on several devices can deadlock with jaxlib 0.10).
# 8 modules, 10 clients with rank-1 updates in a shared column space; client 3 corrupted.
k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
updates = jnp.einsum("mpr,mnrq->mnpq", jax.random.normal(k1, (8, 6, 1)),
                     jax.random.normal(k2, (8, 10, 1, 5)))
updates = updates.at[:, 3].add(3.0 * jax.random.normal(k3, (8, 6, 5)))
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

errors = {}
for label, call in [
    ("clients", lambda: cj.shard_clients(cj.init_server_state(adapters, 12), mesh)),
    ("data", lambda: cj.shard_clients(fed.train._replace(
        **{f: getattr(fed.train, f)[:12] for f in fed.train._fields}), mesh)),
    ("batch", lambda: cj.shard_batch(jnp.zeros((6, 3, 2)), mesh)),
    ("participation", lambda: cj.make_sharded_round(
        graphdef, base, cj.fedit(), mesh, participation=12)),
]:
    try:
        call()
        errors[label] = None
    except ValueError as err:
        errors[label] = str(err)
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- 8 simulated devices -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedit", "clair"])
def test_sharded_round_equals_single_device(eight_devices, name):
    r = eight_devices[name]
    assert r["state_diff"] <= ATOL, r
    assert r["loss_diff"] <= ATOL, r
    assert r["flagged_equal"]
    assert r["moved"] > 100 * ATOL  # the round did change the adapters


@pytest.mark.parametrize("name", ["fedit", "clair"])
def test_sharded_round_outputs_are_split_over_the_devices(eight_devices, name):
    r = eight_devices[name]
    assert r["specs"] == ["P('clients',)"]
    assert r["devices"] == [DEVICES]
    assert r["shard_rows"] == [16 // DEVICES]  # each device holds 2 of the 16 clients
    assert r["global_replicated"]


def test_sharded_vmapped_decompose_equals_unsharded(eight_devices):
    r = eight_devices["decompose"]
    assert r["diff"] <= ATOL and r["iters_equal"]
    assert r["flagged"] == [[m, 3] for m in range(8)]  # client 3's block, in every module
    assert r["specs"] == ["P('clients',)"] and r["devices"] == DEVICES


@pytest.mark.parametrize(
    "label, message",
    [
        ("clients", r"the number of clients \(12\) must be divisible by the size \(8\)"),
        ("data", r"the number of clients \(12\) must be divisible by the size \(8\)"),
        ("batch", r"the batch size \(6\) must be divisible by the size \(8\)"),
        ("participation", r"participation \(12\) must be divisible by the size \(8\)"),
    ],
)
def test_indivisible_sizes_are_rejected(eight_devices, label, message):
    assert eight_devices["errors"][label] is not None
    assert re.search(message, eight_devices["errors"][label]), eight_devices["errors"][label]


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
    assert state.clients["w"].B.sharding.spec == P("clients")
    assert state.flag_counts.sharding.spec == P("clients")
    assert state.global_["w"].B.sharding.spec == P()
    assert state.round.sharding.spec == P()
    np.testing.assert_array_equal(state.clients["w"].B, np.ones((4, 4, 2)))


def test_num_clients_selects_the_split_leaves(mesh):
    tree = {"stacked": jnp.zeros((4, 3)), "other": jnp.zeros((3, 4)), "scalar": jnp.float32(1)}
    placed = cj.shard_clients(tree, mesh, num_clients=4)
    assert placed["stacked"].sharding.spec == P("clients")
    assert placed["other"].sharding.spec == P()
    assert placed["scalar"].sharding.spec == P()


def test_shard_batch_and_replicate(mesh):
    x = cj.shard_batch({"a": jnp.ones((2, 3)), "b": jnp.zeros((2,))}, mesh)
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
