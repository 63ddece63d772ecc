"""The CLAIR rules spread modules of one shape over several devices (``devices=``).

JAX's device count is fixed when its backend starts, so the multi-device runs are
subprocesses with ``jax_num_cpu_devices`` set (2 and 3 simulated CPU devices). Each
runs both server maths of ``cj.clair_aggregator`` on a federation of four modules:
three of one shape (a stack the devices may not divide: padding) and one of
another (a single module, not spread), with ``devices=jax.devices()`` and with
the default (one device). The adapters, flags and diagnostics must be equal bit for
bit. The same subprocess vmaps ``cj.decompose`` and ``cj.clair`` over a batch split
over the devices. A timeout turns a deadlock (concurrent batched LAPACK calls on
jaxlib < 0.11) into a failure.
"""

from __future__ import annotations

import jax
import pytest

import clair_jax as cj
from tests.subprocess_json import run_json

SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))
import jax.numpy as jnp
import numpy as np
import clair_jax as cj

n, r = 12, 3
key = jax.random.key(7)
clients, glob = {}, {}
for i, (p, q) in enumerate([(24, 20), (24, 20), (24, 20), (20, 28)]):
    k = jax.random.split(jax.random.fold_in(key, i), 4)
    shared = jax.random.normal(k[0], (p, r))
    b = shared[None] + 0.05 * jax.random.normal(k[1], (n, p, r))
    b = b.at[:2].set(jax.random.normal(k[2], (2, p, r)))  # clients 0, 1: unrelated B's
    a = jax.random.normal(k[3], (n, r, q))
    clients[f"m{i}"] = cj.LoRAFactors(b, a)
    glob[f"m{i}"] = cj.LoRAFactors(shared, a[5])
out = {"devices": len(jax.devices())}
for run, devices in (("spread", jax.devices()), ("single", None)):
    for math in ("factored", "dense"):
        agg = cj.clair_aggregator(server_math=math, devices=devices)
        res = agg.aggregate(clients, glob, jnp.ones(n), 1, jax.random.key(0))
        leaves = jax.tree.leaves((res.global_, res.clients, res.flagged, res.diagnostics))
        out[run, math] = {
            "leaves": [np.asarray(x, np.float64).ravel().tolist() for x in leaves],
            "flagged": np.flatnonzero(np.asarray(res.flagged)).tolist(),
        }
# A user's jax.vmap of the solvers over a batch split over the devices: the solver's
# factorisations are batched by that vmap (one at a time on CPU with jaxlib < 0.11).
mesh = cj.client_mesh()
batch = jax.random.normal(jax.random.key(1), (2 * len(jax.devices()), 8, 48, 40))
solve = jax.jit(jax.vmap(lambda u: cj.decompose(u, lam_nuc=1.0, lam_block=1.0).low_rank))
found = jax.jit(jax.vmap(lambda u: cj.clair(u).collaborative))
split = cj.shard_batch(batch, mesh)
out["vmapped"] = [
    float(np.max(np.abs(np.asarray(solve(split)) - np.asarray(solve(batch))))),
    bool((np.asarray(found(split)) == np.asarray(found(batch))).all()),
]
print(json.dumps({f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in out.items()}))
"""


@pytest.mark.parametrize("devices", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_spread_modules_equal_the_single_device_run(devices):
    out = run_json(SCRIPT, str(devices))
    assert out["devices"] == devices
    for math in ("factored", "dense"):
        single, spread = out[f"single/{math}"], out[f"spread/{math}"]
        # The unrelated B's are found whichever device solved their module.
        assert single["flagged"][:2] == [0, 1], single
        assert spread["flagged"] == single["flagged"]
        assert len(spread["leaves"]) == len(single["leaves"])
        for got, want in zip(spread["leaves"], single["leaves"], strict=True):
            assert got == want
    # vmap(decompose) and vmap(clair) over a batch split over the devices finish and agree.
    assert out["vmapped"][0] <= 1e-5 and out["vmapped"][1], out["vmapped"]


def test_bad_devices_are_refused():
    with pytest.raises(TypeError, match="devices must be None or a sequence of jax.Device"):
        cj.clair_aggregator(devices=jax.devices()[0])
    with pytest.raises(ValueError, match="non-empty sequence of jax.Device"):
        cj.clair_aggregator(devices=[])
    with pytest.raises(ValueError, match="non-empty sequence of jax.Device"):
        cj.clair_aggregator(server_math="dense", devices=["cpu:0"])
    with pytest.raises(ValueError, match="devices must not repeat a device"):
        cj.clair_aggregator(devices=jax.devices() * 2)


def test_one_device_given_maps_in_place():
    """``devices=jax.devices()`` on one device: the sequential map, same results."""
    key = jax.random.key(3)
    b = jax.random.normal(key, (8, 2, 10, 2))
    a = jax.random.normal(jax.random.fold_in(key, 1), (8, 2, 2, 12))
    clients = {"x": cj.LoRAFactors(b[0], a[0]), "y": cj.LoRAFactors(b[1], a[1])}
    glob = {k: cj.LoRAFactors(f.B[0], f.A[0]) for k, f in clients.items()}
    args = (clients, glob, None, 0, key)
    one = cj.clair_aggregator(devices=jax.devices()[:1]).aggregate(*args)
    default = cj.clair_aggregator().aggregate(*args)
    for got, want in zip(jax.tree.leaves(one), jax.tree.leaves(default), strict=True):
        assert (got == want).all()
