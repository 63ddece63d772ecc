"""The federated LoRA round: a pure function of the server state, client data and a key.

The server state is a pytree of arrays
(:class:`~clair_jax._src.federated.state.ServerState`): the global adapter,
every client's adapter (stacked on a leading client axis) and counters. A round
is a pure function

``round(server_state, client_data, key) -> (server_state, metrics)``

built by :func:`make_round` from a static model description (the NNX
``graphdef``), the frozen base parameters (shared by every client, never
updated) and an :class:`~clair_jax.Aggregator`. In a round:

1. a subset of ``participation`` clients is sampled from ``key`` (all clients
   by default);
2. each participant trains its adapter from its current one with an ``optax``
   optimiser for ``local_steps`` minibatch steps (a ``lax.scan``); the client
   axis is ``jax.vmap``-ed (``client_map="loop"`` runs a Python loop over a
   jitted single-client trainer instead, for comparison);
3. the attack model of :class:`~clair_jax.data.ClientData` is applied to
   what clients send (:func:`~clair_jax._src.federated.attacks.attack`);
4. the aggregator combines the participants' adapters into the next global
   adapter and the adapters participants start the next round from.

One client cannot stop the round or poison the state. The built-in rules
screen what clients send (:mod:`~clair_jax._src.aggregators.screening`): a
client whose adapter is non-finite (``update_scale=nan``, a local training that
diverged, out-of-vocabulary targets, which make its loss NaN) or far larger than
the others' is excluded, flagged and reported in ``RoundMetrics.screened``; the
round goes on for the others. The round then refuses to commit a non-finite
state, whatever the aggregator: a participant whose next adapter would be
non-finite starts from the global adapter instead, and a non-finite global
adapter is not committed (the previous one is kept, ``RoundMetrics.refused`` is
True, and the participant with the largest or non-finite adapter is named with
reason ``"non-finite result"``). A screened-out client starts the next round
from the global adapter (the built-in rules give it that adapter).

Clients that did not take part keep their adapter, except under a broadcast
rule (one whose per-client output equals its global adapter for every
participant, e.g. FedIT), where they receive the new global adapter too
(:func:`~clair_jax._src.federated.state.next_state`). With an aggregator whose
``frozen_factor`` is ``"A"`` (FFA-LoRA) clients train ``B`` only.

:func:`clair_jax.run_rounds` drives many rounds with checkpoint and resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, PRNGKeyArray

from clair_jax._src import validation
from clair_jax._src.aggregators import screening
from clair_jax._src.aggregators.base import Aggregator
from clair_jax._src.data import ClientData
from clair_jax._src.device_split import client_parts, pad_index, padded_size
from clair_jax._src.federated.attacks import attack
from clair_jax._src.federated.state import RoundMetrics, ServerState, next_state
from clair_jax._src.federated.training import (
    check_train_args,
    local_train,
)
from clair_jax._src.lora.types import LoRAFactors

CLIENT_MAPS = ("vmap", "loop")


def _take(tree, idx):
    """Every leaf indexed by ``idx`` along its leading axis."""
    return jax.tree.map(lambda x: x[idx], tree)


def _largest_entry(stacked) -> Float[Array, " k"]:
    """Per client, its largest absolute entry (``inf`` for a non-finite one)."""
    leaves = jax.tree.leaves(stacked)
    big = [jnp.max(jnp.abs(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
    return jnp.nan_to_num(jnp.max(jnp.stack(big), axis=0), nan=jnp.inf)


def _num_participants(participation, n: int) -> int:
    """Clients per round: ``participation`` checked against ``n`` (all when None)."""
    if participation is None:
        return n
    k = validation.check_positive_int(participation, "participation")
    if k > n:
        raise ValueError(f"participation ({k}) must not exceed the number of clients ({n}).")
    return k


def make_round(
    graphdef: nnx.GraphDef,
    base: Mapping,
    aggregator: Aggregator,
    *,
    local_steps: int = 10,
    batch_size: int = 8,
    optimizer: optax.GradientTransformation | None = None,
    participation: int | None = None,
    client_map: str = "vmap",
    jit: bool = True,
    client_sharding: jax.sharding.Sharding | None = None,
) -> Callable[[ServerState, ClientData, PRNGKeyArray], tuple[ServerState, RoundMetrics]]:
    """Builds ``round(server_state, client_data, key) -> (server_state, metrics)``.

    Args:
      graphdef: static part of the model (from :func:`clair_jax.split_lora`).
      base: frozen base parameters, shared by every client (passed to the jitted
        function as an argument, not baked in as a constant).
      aggregator: the server rule (:class:`~clair_jax.Aggregator`).
      local_steps: optimiser steps per client per round.
      batch_size: examples per local step.
      optimizer: the local ``optax`` optimiser, re-initialised every round
        (default ``optax.adam(1e-2)``).
      participation: clients sampled per round (uniformly without replacement
        from the round's key); ``None`` for all.
      client_map: ``"vmap"`` (clients batched) or ``"loop"`` (a Python loop over
        a jitted single-client trainer; the round is then not jittable as a
        whole, and is meant for comparison).
      jit: compile the round with ``jax.jit`` (with ``client_map="vmap"``).
      client_sharding: a sharding of arrays along their leading (client) axis,
        e.g. ``NamedSharding(mesh, P("clients"))`` (with ``client_map="vmap"``).
        The participants' data, adapters and keys, their trained adapters and
        the per-client fields of the new state are constrained to it, so local
        training runs sharded over the mesh and GSPMD inserts the collectives
        of the aggregation. Participants the sharding does not split evenly are
        padded for the local training (repeating the last one) and the padding
        dropped before the aggregation. See :func:`clair_jax.make_sharded_round`.

    Returns:
      The round function. Its metrics are a :class:`RoundMetrics`. Calling it
      raises a ``ValueError`` when the client data or the participation do not
      fit the state's number of clients.

    Raises:
      TypeError: ``aggregator`` is not an :class:`~clair_jax.Aggregator`.
      ValueError: bad ``local_steps``, ``batch_size``, ``participation``,
        ``client_map``, or ``client_sharding`` without ``client_map="vmap"``.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> import clair_jax as cj
      >>> config = cj.TransformerConfig(vocab_size=8, max_len=6, width=8, num_heads=2,
      ...                               mlp_width=8, num_layers=1, lora_rank=2)
      >>> graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
      >>> fed = cj.data.make_federation(jax.random.key(1), cj.data.FederationConfig(
      ...     num_clients=4, vocab_size=8, length=3, shared_tokens=2, specific_tokens=1))
      >>> round_fn = cj.make_round(graphdef, base, cj.fedit(), local_steps=2, batch_size=4)
      >>> state, metrics = round_fn(cj.init_server_state(adapters, 4), fed.train,
      ...                           jax.random.key(2))
      >>> int(state.round), metrics.local_losses.shape
      (1, (4, 2))
    """
    if not isinstance(aggregator, Aggregator):
        raise TypeError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}.")
    validation.check_choice(client_map, "client_map", CLIENT_MAPS)
    local_steps, batch_size = check_train_args(
        local_steps,
        batch_size,
        aggregator.frozen_factor,
        steps_name="local_steps",
        factor_name="aggregator.frozen_factor",
    )
    if participation is not None:
        validation.check_positive_int(participation, "participation")
    if client_sharding is not None and client_map != "vmap":
        raise ValueError(f"client_sharding needs client_map='vmap', got {client_map!r}.")
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    train_kwargs = dict(
        optimizer=optimizer,
        steps=local_steps,
        batch_size=batch_size,
        frozen_factor=aggregator.frozen_factor,
        strict=False,  # a client's bad targets make its update NaN: screened, not fatal
    )

    def train_one(base, start, x, y, w, key):
        return local_train(graphdef, base, start, x, y, w, key, **train_kwargs)

    def select(state: ServerState, data: ClientData, key):
        n = state.flag_counts.shape[0]
        if data.inputs.shape[0] != n:
            raise ValueError(
                f"client_data has {data.inputs.shape[0]} clients (inputs "
                f"{tuple(data.inputs.shape)}), the server state {n}."
            )
        k = _num_participants(participation, n)
        k_sample, k_train, k_agg = jax.random.split(key, 3)
        if k == n:
            idx = jnp.arange(n, dtype=jnp.int32)
        else:
            idx = jnp.sort(jax.random.choice(k_sample, n, (k,), replace=False)).astype(jnp.int32)
        train_keys = jax.vmap(lambda i: jax.random.fold_in(k_train, i))(idx)
        return idx, train_keys, k_agg

    def finish(state: ServerState, data: ClientData, idx, start, trained, losses, k_agg):
        n = state.flag_counts.shape[0]
        sent = attack(start, trained, data.update_scale[idx], data.coordinated[idx])
        args = (sent, state.global_, data.weight[idx], state.round, k_agg)
        if aggregator.uses_start:
            result = aggregator.aggregate(*args, start=start)
        else:
            result = aggregator.aggregate(*args)
        result_clients = {k: LoRAFactors(*map(jnp.asarray, v)) for k, v in result.clients.items()}
        new_global = {k: LoRAFactors(*map(jnp.asarray, v)) for k, v in result.global_.items()}
        # Commit guard: never a non-finite global adapter or next client adapter.
        committed = validation.all_finite(new_global)
        new_global = jax.tree.map(
            lambda a, b: jnp.where(committed, a, b), new_global, dict(state.global_)
        )
        rows_ok = validation.finite_rows(result_clients)
        result_clients = {
            k: LoRAFactors(
                B=jnp.where(rows_ok[:, None, None], f.B, new_global[k].B[None]),
                A=jnp.where(rows_ok[:, None, None], f.A, new_global[k].A[None]),
            )
            for k, f in result_clients.items()
        }
        k_part = idx.shape[0]
        reason = jnp.asarray(
            result.diagnostics.get("screened/reason", jnp.zeros((k_part,), jnp.int32)), jnp.int32
        )
        blame = (jnp.arange(k_part) == jnp.argmax(_largest_entry(sent))) & ~committed
        late = jnp.where(~rows_ok | blame, screening.NON_FINITE_RESULT, screening.OK)
        reason = jnp.where(reason > 0, reason, late).astype(jnp.int32)
        refused = ~committed | jnp.asarray(result.diagnostics.get("screened/refused", False))
        flagged = (
            jnp.zeros((n,), bool).at[idx].set(jnp.asarray(result.flagged, bool) | (reason > 0))
        )
        screened = jnp.zeros((n,), jnp.int32).at[idx].set(reason)
        new_state = next_state(state, idx, result_clients, new_global, flagged)
        metrics = RoundMetrics(idx, losses, flagged, dict(result.diagnostics), screened, refused)
        return new_state, metrics

    def constrain(tree):
        if client_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, client_sharding), tree)

    def vmapped_round(base, state, data, key):
        idx, train_keys, k_agg = select(state, data, key)
        start = _take(state.clients, idx)
        # Sharded: k participants padded to a multiple of the devices (repeating the last);
        # the padding lanes are dropped before the aggregation.
        k, parts = idx.shape[0], 1 if client_sharding is None else client_parts(client_sharding)
        lanes, lane_keys, lane_start = idx, train_keys, start
        if padded_size(k, parts) != k:
            lanes, lane_keys = _take((idx, train_keys), pad_index(k, parts))
            lane_start = _take(state.clients, lanes)
        per_client = constrain(
            (lane_start, data.inputs[lanes], data.targets[lanes], data.mask[lanes], lane_keys)
        )
        trained, losses = constrain(
            jax.vmap(train_one, in_axes=(None, 0, 0, 0, 0, 0))(base, *per_client)
        )
        trained, losses = _take((trained, losses), slice(0, k))
        new_state, metrics = finish(state, data, idx, start, trained, losses, k_agg)
        if client_sharding is not None and state.flag_counts.shape[0] % parts == 0:
            new_state = new_state._replace(
                clients=constrain(new_state.clients),
                flag_counts=constrain(new_state.flag_counts),
                participation_counts=constrain(new_state.participation_counts),
            )
            if isinstance(client_sharding, jax.sharding.NamedSharding):
                # The global adapter stays replicated (the commit guard selects between
                # the new and the previous one, which GSPMD may otherwise split).
                full = jax.sharding.NamedSharding(
                    client_sharding.mesh, jax.sharding.PartitionSpec()
                )
                new_state = new_state._replace(
                    global_=jax.tree.map(
                        lambda x: jax.lax.with_sharding_constraint(x, full), new_state.global_
                    )
                )
        return new_state, metrics

    if client_map == "vmap":
        compiled = jax.jit(vmapped_round) if jit else vmapped_round

        def round_fn(state: ServerState, client_data: ClientData, key: PRNGKeyArray):
            return compiled(base, state, client_data, key)

        return round_fn

    train_jit = jax.jit(train_one)
    select_jit = jax.jit(select)
    finish_jit = jax.jit(finish)

    def looped_round(state: ServerState, client_data: ClientData, key: PRNGKeyArray):
        idx, train_keys, k_agg = select_jit(state, client_data, key)
        start = _take(state.clients, idx)
        outs = []
        for j, i in enumerate(np.asarray(idx)):
            outs.append(
                train_jit(
                    base,
                    _take(state.clients, i),
                    client_data.inputs[i],
                    client_data.targets[i],
                    client_data.mask[i],
                    train_keys[j],
                )
            )
        trained = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[0] for o in outs])
        losses = jnp.stack([o[1] for o in outs])
        return finish_jit(state, client_data, idx, start, trained, losses, k_agg)

    return looped_round
