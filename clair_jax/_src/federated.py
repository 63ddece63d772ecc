"""Pure functional federated LoRA rounds, evaluation, and checkpoint/resume.

The server state is a pytree of arrays (:class:`ServerState`): the global
adapter, every client's adapter (stacked on a leading client axis) and
counters. A round is a pure function

``round(server_state, client_data, key) -> (server_state, metrics)``

built by :func:`make_round` from a static model description (the NNX
``graphdef``), the frozen base parameters (shared by every client, never
updated) and an :class:`~clair_jax._src.aggregators.Aggregator`. In a round:

1. a subset of ``participation`` clients is sampled from ``key`` (all clients
   by default);
2. each participant trains its adapter from its current one with an ``optax``
   optimiser for ``local_steps`` minibatch steps (a ``lax.scan``); the client
   axis is ``jax.vmap``-ed (``client_map="loop"`` runs a Python loop over a
   jitted single-client trainer instead, for comparison);
3. the attack model of :class:`~clair_jax._src.data.ClientData` is applied to
   what clients send: ``sent_i = start_i + s_i (trained_i - start_i)`` factor
   by factor (``s_i = update_scale``: 1 honest, ``> 1`` scaled, ``< 0`` sign
   flipped), and clients marked ``coordinated`` all send
   ``start_i + mean_{j coordinated} s_j (trained_j - start_j)``;
4. the aggregator combines the participants' adapters into the next global
   adapter and the adapters participants start the next round from.

Clients that did not take part keep their adapter, except under a broadcast
rule (one whose per-client output equals its global adapter for every
participant, e.g. FedIT), where they receive the new global adapter too.
With an aggregator whose ``frozen_factor`` is ``"A"`` (FFA-LoRA) clients
train ``B`` only.

:func:`run_rounds` drives many rounds with a progress bar, deriving round
``t``'s key as ``fold_in(key, t)`` and checkpointing the state after every
round (atomically, with ``numpy.savez``), so that a crash loses at most the
round in flight and a resumed run is identical to an uninterrupted one.
Leaves of the ``ml_dtypes`` types NumPy cannot store (``bfloat16``, the
``float8`` types, ...) are saved as their raw bits (unsigned integers of the
same width) together with their dtype name, and loaded back bit for bit.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from clair_jax._src import lora, validation
from clair_jax._src.aggregators import Adapters, Aggregator, LoRAFactors
from clair_jax._src.data import ClientData
from clair_jax._src.progress import ProgressBar

CLIENT_MAPS = ("vmap", "loop")


class ServerState(NamedTuple):
    """Everything the server carries from one round to the next (arrays only).

    Attributes:
      round: int32 scalar, rounds completed.
      global_: the global adapter (unstacked ``Adapters``).
      clients: ``(n, ...)`` the adapter each client starts its next round from.
      flag_counts: ``(n,)`` int32, rounds in which each client was flagged.
      participation_counts: ``(n,)`` int32, rounds each client took part in.
    """

    round: Int[Array, ""]
    global_: Adapters
    clients: Adapters
    flag_counts: Int[Array, " n"]
    participation_counts: Int[Array, " n"]


class RoundMetrics(NamedTuple):
    """What a round reports.

    Attributes:
      participants: ``(k,)`` int32 indices of the clients that took part (sorted).
      local_losses: ``(k, local_steps)`` each participant's minibatch loss per step.
      flagged: ``(n,)`` bool, clients the aggregator flagged this round.
      diagnostics: the aggregator's diagnostics.
    """

    participants: Int[Array, " k"]
    local_losses: Float[Array, "k s"]
    flagged: Bool[Array, " n"]
    diagnostics: dict[str, Array]


class Evaluation(NamedTuple):
    """Per-client held-out metrics over the masked positions.

    Attributes:
      accuracy: ``(n,)`` token accuracy (argmax of the logits).
      loss: ``(n,)`` mean cross-entropy.
    """

    accuracy: Float[Array, " n"]
    loss: Float[Array, " n"]


def init_server_state(adapters: Adapters, num_clients: int) -> ServerState:
    """The state before round 0: every client starts from the initial ``adapters``.

    Args:
      adapters: unstacked initial adapters (e.g. from :func:`clair_jax._src.lora.split_lora`).
      num_clients: ``n``.
    """
    n = validation.check_positive_int(num_clients, "num_clients")
    clients = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), adapters)
    return ServerState(
        round=jnp.zeros((), jnp.int32),
        global_=dict(adapters),
        clients=clients,
        flag_counts=jnp.zeros((n,), jnp.int32),
        participation_counts=jnp.zeros((n,), jnp.int32),
    )


# --- losses and local training -----------------------------------------------------------


def masked_cross_entropy(
    logits: Float[Array, "... t v"], targets: Int[Array, "... t"], mask: Float[Array, "... t"]
) -> Float[Array, ""]:
    """``Σ mask * CE(logits, targets) / Σ mask`` (0 when the mask is empty).

    Targets where ``mask`` is 0 are ignored (they may hold any padding value);
    elsewhere they must be in ``[0, vocab)`` (an error otherwise, not a NaN loss).
    """
    targets = validation.check_indices(
        jnp.where(mask != 0, targets, 0), logits.shape[-1], "targets (where mask != 0)"
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _weighted_mean(ce, mask)


def _weighted_mean(values: Array, weights: Array) -> Array:
    """``Σ w v / Σ w``, and 0 when ``Σ w = 0`` (weights of any positive total, not only 0/1)."""
    total = jnp.sum(weights)
    nonempty = total > 0
    return jnp.where(nonempty, jnp.sum(weights * values) / jnp.where(nonempty, total, 1), 0)


def _partition(adapters: Adapters, frozen_factor: str | None):
    """Trainable and fixed parts of the adapters (``frozen_factor`` is not trained)."""
    if frozen_factor is None:
        return adapters, None
    if frozen_factor == "A":
        return {k: f.B for k, f in adapters.items()}, {k: f.A for k, f in adapters.items()}
    return {k: f.A for k, f in adapters.items()}, {k: f.B for k, f in adapters.items()}


def _combine(trainable, fixed, frozen_factor: str | None) -> Adapters:
    if frozen_factor is None:
        return trainable
    if frozen_factor == "A":
        return {k: LoRAFactors(B=trainable[k], A=fixed[k]) for k in trainable}
    return {k: LoRAFactors(B=fixed[k], A=trainable[k]) for k in trainable}


def _check_train_args(
    steps, batch_size, frozen_factor, *, steps_name="steps", factor_name="frozen_factor"
) -> tuple[int, int]:
    """Checks the local-training settings; returns ``(steps, batch_size)`` as ints."""
    steps = validation.check_positive_int(steps, steps_name)
    batch_size = validation.check_positive_int(batch_size, "batch_size")
    if frozen_factor not in (None, "A", "B"):
        raise ValueError(f"{factor_name} must be None, 'A' or 'B', got {frozen_factor!r}.")
    return steps, batch_size


def local_train(
    graphdef: nnx.GraphDef,
    base: Mapping,
    adapters: Adapters,
    inputs: Int[Array, "m t"],
    targets: Int[Array, "m t"],
    mask: Float[Array, "m t"],
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    frozen_factor: str | None = None,
) -> tuple[Adapters, Float[Array, " s"]]:
    """One client's local fine-tuning of its adapters (base frozen), a pure function.

    ``steps`` optimiser steps, each on ``batch_size`` of the client's ``m``
    examples drawn without replacement from ``key`` (all of them when
    ``batch_size >= m``), minimising :func:`masked_cross_entropy`. The optimiser
    state starts fresh. Gradients reach only the adapter factors; the factor
    named ``frozen_factor`` stays fixed.

    Returns:
      The trained adapters and the ``(steps,)`` minibatch losses (before each step).

    Raises:
      ValueError: ``steps`` or ``batch_size`` not a positive int, ``frozen_factor``
        not ``None``, ``"A"`` or ``"B"``, or ``inputs``/``targets``/``mask`` not
        of one ``(m, t)`` shape.
    """
    steps, batch_size = _check_train_args(steps, batch_size, frozen_factor)
    if inputs.ndim != 2 or targets.shape != inputs.shape or mask.shape != inputs.shape:
        raise ValueError(
            f"inputs, targets and mask must have one shape (examples, time), got inputs "
            f"{tuple(inputs.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}."
        )
    m = inputs.shape[0]
    trainable, fixed = _partition(adapters, frozen_factor)
    opt_state = optimizer.init(trainable)

    def loss_fn(params, batch):
        x, y, w = batch
        logits = lora.apply_lora(graphdef, base, _combine(params, fixed, frozen_factor), x)
        return masked_cross_entropy(logits, y, w)

    def step(carry, step_key):
        params, opt_state = carry
        if batch_size >= m:
            batch = (inputs, targets, mask)
        else:
            idx = jax.random.choice(step_key, m, (batch_size,), replace=False)
            batch = (inputs[idx], targets[idx], mask[idx])
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (trainable, _), losses = jax.lax.scan(
        step, (trainable, opt_state), jax.random.split(key, steps)
    )
    return _combine(trainable, fixed, frozen_factor), losses


def evaluate_clients(
    graphdef: nnx.GraphDef, base: Mapping, adapters: Adapters, data: ClientData
) -> Evaluation:
    """Held-out accuracy and loss of each client's adapter on its own data (vmapped).

    Args:
      graphdef: the model's static part.
      base: frozen base parameters.
      adapters: ``(n, ...)`` stacked adapters, one per client.
      data: :class:`ClientData` with ``n`` clients.
    """

    def one(adapters_i, x, y, w):
        logits = lora.apply_lora(graphdef, base, adapters_i, x)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(w.dtype)
        accuracy = _weighted_mean(correct, w)
        return accuracy, masked_cross_entropy(logits, y, w)

    accuracy, loss = jax.vmap(one)(adapters, data.inputs, data.targets, data.mask)
    return Evaluation(accuracy, loss)


# --- the round ---------------------------------------------------------------------------


def _take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def _attack(start: Adapters, trained: Adapters, scale, coordinated) -> Adapters:
    """What clients send under the attack model (see the module docstring)."""

    def sent(x0, x1):
        shape = (-1,) + (1,) * (x0.ndim - 1)
        delta = scale.reshape(shape).astype(x0.dtype) * (x1 - x0)
        group = coordinated.reshape(shape)
        count = jnp.maximum(jnp.sum(coordinated), 1).astype(x0.dtype)
        common = jnp.sum(jnp.where(group, delta, 0.0), axis=0, keepdims=True) / count
        return x0 + jnp.where(group, common, delta)

    return jax.tree.map(sent, start, trained)


def _is_broadcast(result_clients: Adapters, result_global: Adapters) -> Bool[Array, ""]:
    same = jax.tree.map(lambda c, g: jnp.all(c == g[None]), result_clients, result_global)
    return jnp.all(jnp.stack(jax.tree.leaves(same)))


def _num_participants(participation, n: int) -> int:
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
      graphdef: static part of the model (from :func:`clair_jax._src.lora.split_lora`).
      base: frozen base parameters, shared by every client (passed to the jitted
        function as an argument, not baked in as a constant).
      aggregator: the server rule (:class:`~clair_jax._src.aggregators.Aggregator`).
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
        of the aggregation. See :func:`clair_jax.make_sharded_round`.

    Returns:
      The round function. Its metrics are a :class:`RoundMetrics`.

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
    local_steps, batch_size = _check_train_args(
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
        sent = _attack(start, trained, data.update_scale[idx], data.coordinated[idx])
        args = (sent, state.global_, data.weight[idx], state.round, k_agg)
        if aggregator.uses_start:
            result = aggregator.aggregate(*args, start=start)
        else:
            result = aggregator.aggregate(*args)
        result_clients = jax.tree.map(jnp.asarray, dict(result.clients))
        new_global = {k: LoRAFactors(*map(jnp.asarray, v)) for k, v in result.global_.items()}
        if idx.shape[0] == n:
            clients = result_clients
        else:
            broadcast = _is_broadcast(result_clients, new_global)
            kept = jax.tree.map(
                lambda old, g: jnp.where(broadcast, jnp.broadcast_to(g, old.shape), old),
                state.clients,
                new_global,
            )
            clients = jax.tree.map(lambda c, r: c.at[idx].set(r), kept, result_clients)
        flagged = jnp.zeros((n,), bool).at[idx].set(jnp.asarray(result.flagged, bool))
        new_state = ServerState(
            round=state.round + 1,
            global_=new_global,
            clients=clients,
            flag_counts=state.flag_counts + flagged.astype(jnp.int32),
            participation_counts=state.participation_counts.at[idx].add(1),
        )
        return new_state, RoundMetrics(idx, losses, flagged, dict(result.diagnostics))

    def constrain(tree):
        if client_sharding is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, client_sharding), tree)

    def vmapped_round(base, state, data, key):
        idx, train_keys, k_agg = select(state, data, key)
        start = _take(state.clients, idx)
        per_client = constrain(
            (start, data.inputs[idx], data.targets[idx], data.mask[idx], train_keys)
        )
        trained, losses = constrain(
            jax.vmap(train_one, in_axes=(None, 0, 0, 0, 0, 0))(base, *per_client)
        )
        new_state, metrics = finish(state, data, idx, start, trained, losses, k_agg)
        if client_sharding is not None:
            new_state = new_state._replace(
                clients=constrain(new_state.clients),
                flag_counts=constrain(new_state.flag_counts),
                participation_counts=constrain(new_state.participation_counts),
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


# --- checkpoints -------------------------------------------------------------------------


#: Entry of a checkpoint holding ``{entry: dtype name}`` (JSON) for leaves stored as raw bits.
_DTYPES_ENTRY = "__dtypes__"
#: Entry of a checkpoint written by :func:`run_rounds`: the run's identity (_run_identity),
#: checked by _load when it resumes.
_RUN_ENTRY = "__run__"
_RESERVED = frozenset({_DTYPES_ENTRY, _RUN_ENTRY})


def _stored_as_bits(dtype: np.dtype) -> bool:
    """Whether ``numpy.savez`` cannot store ``dtype`` (ml_dtypes types: void to NumPy)."""
    return dtype.kind == "V" and not dtype.fields


def _flat_arrays(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, dtypes = {}, {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        value = np.asarray(leaf)
        if _stored_as_bits(value.dtype):  # e.g. bfloat16: NumPy would write raw void '|V2'
            dtypes[name] = value.dtype.name
            value = value.view(np.dtype(f"u{value.dtype.itemsize}"))
        arrays[name] = value
    if dtypes:
        arrays[_DTYPES_ENTRY] = np.asarray(json.dumps(dtypes, sort_keys=True))
    return arrays


def save_checkpoint(path: str | os.PathLike, tree: Any) -> None:
    """Saves a pytree of arrays (e.g. a :class:`ServerState`) with ``numpy.savez``.

    The file is written to a temporary name in the same directory and renamed
    over ``path``, so a crash never leaves a half-written checkpoint.

    Leaves of a dtype NumPy cannot store (``bfloat16``, ``float8_*``, ...:
    ``ml_dtypes`` types) are written as their raw bits, unsigned integers of the
    same width, with their dtype names in an extra entry; :func:`load_checkpoint`
    restores them exactly.

    Args:
      path: destination file (conventionally ``*.npz``).
      tree: a pytree whose leaves are arrays (no PRNG key arrays).
    """
    _save(path, tree, run=None)


def _save(path: str | os.PathLike, tree: Any, run: str | None) -> None:
    arrays = _flat_arrays(tree)
    if run is not None:
        arrays[_RUN_ENTRY] = np.asarray(run)
    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def _run_identity(key: PRNGKeyArray, run_id: str | None) -> str:
    """What makes a :func:`run_rounds` run: the raw bits of its key and the caller's ``run_id``."""
    bits = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return json.dumps({"key": bits, "run_id": run_id}, sort_keys=True)


def _file_mode(path: str) -> int:
    """Permissions for a file written over ``path``: its own if it exists, else the umask's."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it over
    ``path``: a crash leaves the old file or the new one, never half of one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _file_mode(path))
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Loads a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    Args:
      path: the checkpoint file.
      like: a pytree with the expected structure, shapes and dtypes (e.g. the
        initial state); its values are not used.

    Raises:
      ValueError: the file's entries, shapes or dtypes differ from ``like``'s.
    """
    return _load(path, like, run=None)


def _load(path: str | os.PathLike, like: Any, run: str | None) -> Any:
    """:func:`load_checkpoint`; with ``run``, also an error if the file records another run."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    with np.load(os.fspath(path)) as stored:
        stored_run = str(stored[_RUN_ENTRY]) if _RUN_ENTRY in stored.files else None
        if run is not None and stored_run is not None and stored_run != run:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} was written by another run ({stored_run}), "
                f"not this one ({run}); delete it, use another path, or pass the key and "
                "run_id it was written with."
            )
        names = set(stored.files) - _RESERVED
        dtypes = json.loads(str(stored[_DTYPES_ENTRY])) if _DTYPES_ENTRY in stored.files else {}
        expected = [jax.tree_util.keystr(p) for p, _ in leaves]
        if names != set(expected):
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not match the expected structure: "
                f"missing {missing[:5]}, unexpected {extra[:5]}."
            )
        out = []
        for name, (_, leaf) in zip(expected, leaves, strict=True):
            value = stored[name]
            leaf = np.asarray(leaf)
            if name in dtypes:  # raw bits of an ml_dtypes type, with its name
                if dtypes[name] != leaf.dtype.name:
                    raise ValueError(
                        f"checkpoint entry {name}: stored {value.shape} {dtypes[name]}, "
                        f"expected {leaf.shape} {leaf.dtype}."
                    )
                value = value.view(leaf.dtype)
            elif value.dtype.kind == "V" and _stored_as_bits(leaf.dtype):
                # Written before the dtype names were stored: raw void of the same width.
                if value.dtype.itemsize == leaf.dtype.itemsize:
                    value = value.view(leaf.dtype)
            if value.shape != leaf.shape or value.dtype != leaf.dtype:
                raise ValueError(
                    f"checkpoint entry {name}: stored {value.shape} {value.dtype}, expected "
                    f"{leaf.shape} {leaf.dtype}."
                )
            out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out)


def run_rounds(
    round_fn: Callable,
    state: ServerState,
    client_data: ClientData,
    key: PRNGKeyArray,
    num_rounds: int,
    *,
    checkpoint: str | os.PathLike | None = None,
    run_id: str | None = None,
    progress: bool | None = None,
    desc: str = "rounds",
    callback: Callable[[ServerState, RoundMetrics], Any] | None = None,
) -> tuple[ServerState, list[RoundMetrics]]:
    """Runs rounds until ``num_rounds`` are done, checkpointing after each one.

    Round ``t`` uses the key ``jax.random.fold_in(key, t)``, so the result
    depends only on ``key`` and the initial state, whether the run was
    interrupted or not. If ``checkpoint`` exists it is loaded first (its
    structure must match ``state``) and the run resumes after its last
    completed round. The checkpoint records the run's key and ``run_id``;
    resuming from one written by another run (another seed, or another
    ``run_id``) is an error rather than a silent continuation of that run.

    Args:
      round_fn: from :func:`make_round`.
      state: the initial state (:func:`init_server_state`).
      client_data: the clients' training data.
      key: ``jax.random`` key of the whole run.
      num_rounds: total rounds (including those already in the checkpoint); a
        state (or checkpoint) already that far is returned as it is.
      checkpoint: file to resume from and to save to after every round.
      run_id: a string naming the run's configuration (e.g. the aggregator and
        its options), stored in the checkpoint and checked on resume, so that
        runs differing in more than their key cannot share a checkpoint by
        mistake. (A file written by :func:`save_checkpoint` has no run record
        and is resumed from unchecked.)
      progress: show a text progress bar (``None``: only on a terminal).
      desc: the progress bar's label.
      callback: called as ``callback(state, metrics)`` after every round run
        (and after its checkpoint is written), e.g. to evaluate the clients.

    Returns:
      The final state and the metrics of the rounds run by this call.

    Raises:
      ValueError: ``checkpoint`` does not fit ``state`` (entries, shapes, dtypes)
        or was written by a run with another key or ``run_id``.
    """
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, numbers.Integral):
        raise TypeError(f"num_rounds must be an int, got {type(num_rounds).__name__}.")
    if num_rounds < 0:
        raise ValueError(f"num_rounds must be >= 0, got {num_rounds}.")
    num_rounds = int(num_rounds)
    if run_id is not None and not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str or None, got {type(run_id).__name__}.")
    identity = _run_identity(key, run_id)
    if checkpoint is not None and os.path.exists(checkpoint):
        state = _load(checkpoint, state, run=identity)
    history = []
    start = int(state.round)
    with ProgressBar(max(num_rounds - start, 0), desc=desc, enabled=progress) as bar:
        for t in range(start, num_rounds):
            state, metrics = round_fn(state, client_data, jax.random.fold_in(key, t))
            if checkpoint is not None:
                _save(checkpoint, state, run=identity)
            history.append(jax.device_get(metrics))
            if callback is not None:
                callback(state, metrics)
            bar.update(loss=float(np.mean(metrics.local_losses[:, -1])))
    return state, history
