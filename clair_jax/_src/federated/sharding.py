"""Federated rounds and batched solvers sharded over devices with ``jax.sharding``.

The federated round keeps every per-client quantity on a leading client axis
(the clients' adapters, their data, the flag and participation counters), and
the solvers are ``jax.vmap``-able over a leading batch axis (e.g. one problem per
adapted module). Both axes can be split over the devices of a
:class:`jax.sharding.Mesh`: the arrays are placed with a
:class:`~jax.sharding.NamedSharding` whose partition spec names the mesh axis
for their leading dimension (``P("clients")``) and everything else (the base
model, the global adapter, scalars) is replicated. ``jax.jit`` then compiles
one SPMD program (GSPMD): each device trains its own clients, and the
collectives of the aggregation (the weighted sums of FedIT, the stacked matrix
of CLAIR, ...) are inserted by the compiler. Nothing else changes: the same
code runs on one CPU, on the 8 simulated CPU devices of
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, on the GPUs of a host,
or on every chip of a TPU slice (after :func:`jax.distributed.initialize` on
every host, :func:`jax.devices` lists the devices of all hosts).

:func:`make_sharded_round` builds a round whose inputs are placed with
:func:`shard_clients` and whose local training is constrained to stay sharded
(through ``client_sharding`` of :func:`clair_jax.make_round`).

Any client count works on any mesh. A ``jax.Array`` is split only into equal
pieces, so a client axis whose length ``n`` the mesh axis size does not divide
is replicated by :func:`shard_clients`, and the round pads its participants to
a multiple of the device count for the local training (the padding lanes repeat
a participant and are dropped before the aggregation: they never reach the
aggregator, the flags, the counters or the metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import PRNGKeyArray

from clair_jax._src.aggregators.base import Aggregator
from clair_jax._src.data import ClientData
from clair_jax._src.device_split import line_mesh
from clair_jax._src.federated.round import make_round
from clair_jax._src.federated.state import RoundMetrics, ServerState

DEFAULT_AXIS = "clients"
"""Name of the mesh axis :func:`client_mesh` creates."""

T = TypeVar("T")


def client_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DEFAULT_AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (all visible devices by default).

    Args:
      devices: the devices to use, in order (default :func:`jax.devices`, which
        in a multi-process run lists the devices of every process).
      axis_name: name of the mesh axis.

    Returns:
      A :class:`jax.sharding.Mesh` with one axis, ``axis_name``, of size
      ``len(devices)``.

    Raises:
      ValueError: an empty or repeated device list, or an empty axis name.

    Examples:
      >>> import clair_jax as cj
      >>> mesh = cj.client_mesh()
      >>> mesh.axis_names, mesh.size == len(jax.devices())
      (('clients',), True)
    """
    return line_mesh(jax.devices() if devices is None else devices, axis_name)


def _mesh_axis(mesh: Mesh, axis_name: str | None) -> tuple[str, int]:
    """The mesh axis to shard over and its size (the only axis by default)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    names = tuple(mesh.axis_names)
    if axis_name is None:
        if len(names) != 1:
            raise ValueError(
                f"mesh has axes {names} (shape {dict(mesh.shape)}): pass axis_name to choose "
                "the one that splits the client or batch axis."
            )
        axis_name = names[0]
    if axis_name not in names:
        raise ValueError(
            f"axis_name {axis_name!r} is not an axis of the mesh, whose axes are {names}."
        )
    return axis_name, int(mesh.shape[axis_name])


def client_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
    """Sharding of an array along its leading axis over one mesh axis.

    ``NamedSharding(mesh, P(axis_name))``: dimension 0 is split over the mesh
    axis, the other dimensions (and the other mesh axes) are replicated. It
    applies to arrays of any rank ``>= 1``.

    Args:
      mesh: the device mesh.
      axis_name: the mesh axis (default: the mesh's only axis).

    Examples:
      >>> import clair_jax as cj
      >>> cj.client_sharding(cj.client_mesh()).spec
      P('clients',)
    """
    axis_name, _ = _mesh_axis(mesh, axis_name)
    return NamedSharding(mesh, P(axis_name))


def replicate(tree: T, mesh: Mesh) -> T:
    """Places every array leaf of ``tree`` on all devices of ``mesh`` (a full copy each).

    Args:
      tree: a pytree of arrays (e.g. the frozen base parameters).
      mesh: the device mesh.

    Returns:
      ``tree`` with every leaf a :class:`jax.Array` replicated over ``mesh``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import clair_jax as cj
      >>> x = cj.replicate({"w": jnp.ones((3, 2))}, cj.client_mesh())
      >>> x["w"].sharding.is_fully_replicated
      True
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _leading(leaf) -> int | None:
    """Length of ``leaf``'s leading axis (None for a scalar)."""
    shape = np.shape(leaf)
    return int(shape[0]) if len(shape) else None


def _check_divisible(n: int, what: str, size: int, axis_name: str, shapes: Any) -> None:
    """Raises a ``ValueError`` unless ``n`` splits evenly over the mesh axis of ``size``."""
    if n % size:
        raise ValueError(
            f"{what} ({n}) must be divisible by the size ({size}) of mesh axis "
            f"{axis_name!r} to be split evenly over its devices; leading axes: {shapes}."
        )


def _shapes(tree) -> list[tuple[int, ...]]:
    """The shapes of ``tree``'s leaves (for error messages)."""
    return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


def shard_clients(
    tree: T, mesh: Mesh, num_clients: int | None = None, *, axis_name: str | None = None
) -> T:
    """Splits the client axis of ``tree`` over ``mesh``; replicates everything else.

    Every array leaf whose leading axis is the client axis (length
    ``num_clients``) is placed with ``NamedSharding(mesh, P(axis_name))``, each
    device holding ``num_clients / mesh.shape[axis_name]`` consecutive clients;
    the other leaves (scalars, unstacked arrays such as the base model) are
    replicated. Leaves already placed that way are not copied. A client count
    the mesh axis size does not divide cannot be split into equal pieces: the
    client-axis leaves are then replicated too (:func:`make_sharded_round` still
    splits the local training, padding the participants inside the round).

    * :class:`~clair_jax.ServerState`: ``clients``, ``flag_counts`` and
      ``participation_counts`` are split; ``round`` and ``global_`` are
      replicated (whatever their shapes).
    * Anything else (e.g. :class:`clair_jax.data.ClientData`, a dict of stacked
      adapters): with ``num_clients=None`` every leaf of rank ``>= 1`` must share
      its leading length, which is the client count; with ``num_clients`` given,
      exactly the leaves whose leading length is ``num_clients`` are split.

    Args:
      tree: the pytree to place.
      mesh: the device mesh (e.g. :func:`client_mesh`).
      num_clients: the client count ``n`` (default: inferred as above).
      axis_name: the mesh axis to split over (default: the mesh's only axis).

    Returns:
      ``tree`` with its leaves placed on the mesh.

    Raises:
      ValueError: the leading axes disagree (with ``num_clients=None``),
        ``num_clients`` differs from a :class:`~clair_jax.ServerState`'s client
        count, or no leaf has a client axis.
      TypeError: ``mesh`` is not a :class:`jax.sharding.Mesh`.

    Examples:
      >>> import jax
      >>> import clair_jax as cj
      >>> fed = cj.data.make_federation(jax.random.key(0), cj.data.FederationConfig(
      ...     num_clients=4, vocab_size=8, length=3, shared_tokens=2, specific_tokens=1))
      >>> train = cj.shard_clients(fed.train, cj.client_mesh())
      >>> train.inputs.shape, train.inputs.sharding.spec
      ((4, 16, 6), P('clients',))
    """
    axis_name, size = _mesh_axis(mesh, axis_name)
    split = NamedSharding(mesh, P(axis_name))
    full = NamedSharding(mesh, P())
    if num_clients is not None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
            raise TypeError(f"num_clients must be an int, got {num_clients!r}.")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
        num_clients = int(num_clients)

    if isinstance(tree, ServerState):
        n = int(np.shape(tree.flag_counts)[0])
        if num_clients is not None and num_clients != n:
            raise ValueError(
                f"num_clients ({num_clients}) differs from the server state's client count "
                f"({n}, flag_counts {tuple(np.shape(tree.flag_counts))})."
            )
        split = split if n % size == 0 else full
        return tree._replace(
            round=jax.device_put(tree.round, full),
            global_=jax.device_put(tree.global_, full),
            clients=jax.device_put(tree.clients, split),
            flag_counts=jax.device_put(tree.flag_counts, split),
            participation_counts=jax.device_put(tree.participation_counts, split),
        )

    leaves, treedef = jax.tree.flatten(tree)
    leading = [_leading(x) for x in leaves]
    if num_clients is None:
        lengths = sorted({d for d in leading if d is not None})
        if len(lengths) != 1:
            raise ValueError(
                "cannot infer the client axis: the leaves' leading axes are "
                f"{sorted(set(_shapes(tree)))}; pass num_clients (leaves whose leading "
                "length is num_clients are split, the others replicated)."
            )
        num_clients = lengths[0]
    elif num_clients not in leading:
        raise ValueError(
            f"no leaf has a leading axis of length num_clients={num_clients}; leaf shapes "
            f"{sorted(set(_shapes(tree)))}."
        )
    split = split if num_clients % size == 0 else full
    placed = [
        jax.device_put(x, split if d == num_clients else full)
        for x, d in zip(leaves, leading, strict=True)
    ]
    return jax.tree.unflatten(treedef, placed)


def shard_batch(x: T, mesh: Mesh, *, axis_name: str | None = None) -> T:
    """Splits the leading (batch) axis of every leaf of ``x`` over ``mesh``.

    For a stack of independent problems, e.g. the ``(m, n, p, q)`` updates of
    ``m`` adapted modules solved by ``jax.vmap(cj.decompose)``: under
    ``jax.jit`` each device then solves its ``m / mesh.shape[axis_name]``
    problems (a vmapped ``while_loop`` runs until every problem of the batch has
    stopped, so the devices synchronise on the stopping test).

    Args:
      x: an array or pytree of arrays sharing the leading batch length ``m``.
      mesh: the device mesh.
      axis_name: the mesh axis to split over (default: the mesh's only axis).

    Returns:
      ``x`` placed with ``NamedSharding(mesh, P(axis_name))``.

    Raises:
      ValueError: a leaf without a leading axis, leaves with different leading
        lengths, or ``m`` not divisible by the mesh axis size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import clair_jax as cj
      >>> mesh = cj.client_mesh()
      >>> updates = cj.shard_batch(jnp.zeros((4, 6, 5, 3)), mesh)   # 4 modules
      >>> solve = jax.jit(jax.vmap(lambda u: cj.decompose(u, lam_nuc=1.0, lam_block=1.0)))
      >>> solve(updates).low_rank.shape
      (4, 6, 5, 3)
    """
    axis_name, size = _mesh_axis(mesh, axis_name)
    shapes = _shapes(x)
    if not shapes:
        raise ValueError("x has no array leaves to shard.")
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            "every leaf of x must have the same leading (batch) axis; got shapes "
            f"{sorted(set(shapes))}."
        )
    _check_divisible(shapes[0][0], "the batch size", size, axis_name, sorted(set(shapes)))
    return jax.device_put(x, NamedSharding(mesh, P(axis_name)))


def make_sharded_round(
    graphdef: nnx.GraphDef,
    base: Mapping,
    aggregator: Aggregator,
    mesh: Mesh | None = None,
    *,
    axis_name: str | None = None,
    **round_kwargs: Any,
) -> Callable[[ServerState, ClientData, PRNGKeyArray], tuple[ServerState, RoundMetrics]]:
    """:func:`clair_jax.make_round` with the clients split over the devices of ``mesh``.

    The base parameters are replicated on every device, the round's inputs are
    placed with :func:`shard_clients` (a no-op for inputs already placed), and
    the jitted round keeps the participants' data, adapters, trained adapters
    and the per-client fields of the new state split over the mesh axis (so
    each device trains its own clients, and the next round starts from sharded
    state). GSPMD inserts the collectives of the aggregation. The result is the
    single-device round's up to floating-point reassociation in the reductions.

    Args:
      graphdef: static part of the model.
      base: frozen base parameters (replicated over the mesh).
      aggregator: the server rule.
      mesh: the device mesh (default :func:`client_mesh` over all devices).
      axis_name: the mesh axis that splits the clients (default: the only one).
      **round_kwargs: the keyword arguments of :func:`clair_jax.make_round`
        (``local_steps``, ``batch_size``, ``optimizer``, ``participation``, ...);
        ``client_map`` must be ``"vmap"``.

    Returns:
      ``round(state, client_data, key) -> (state, metrics)``, for any client
      count and ``participation``: participants that do not split evenly over
      the mesh axis are padded for the local training (the padding lanes repeat
      the last participant, run on the devices that would otherwise idle, and
      are dropped before the aggregation).

    Raises:
      ValueError: ``client_map`` other than ``"vmap"``, or ``client_sharding``
        given.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> import clair_jax as cj
      >>> config = cj.TransformerConfig(vocab_size=8, max_len=6, width=8, num_heads=2,
      ...                               mlp_width=8, num_layers=1, lora_rank=2)
      >>> graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
      >>> fed = cj.data.make_federation(jax.random.key(1), cj.data.FederationConfig(
      ...     num_clients=4, vocab_size=8, length=3, shared_tokens=2, specific_tokens=1))
      >>> mesh = cj.client_mesh()
      >>> round_fn = cj.make_sharded_round(graphdef, base, cj.fedit(), mesh,
      ...                                  local_steps=2, batch_size=4)
      >>> state, metrics = round_fn(cj.init_server_state(adapters, 4), fed.train,
      ...                           jax.random.key(2))
      >>> state.participation_counts.sharding.device_set == set(mesh.devices.flat)
      True
      >>> int(state.round), metrics.local_losses.shape
      (1, (4, 2))
    """
    mesh = client_mesh() if mesh is None else mesh
    axis_name, _ = _mesh_axis(mesh, axis_name)
    if "client_sharding" in round_kwargs:
        raise ValueError("client_sharding is set by make_sharded_round from mesh and axis_name.")
    if round_kwargs.get("client_map", "vmap") != "vmap":
        raise ValueError(
            f"make_sharded_round needs client_map='vmap', got {round_kwargs['client_map']!r}."
        )
    round_fn = make_round(
        graphdef,
        replicate(base, mesh),
        aggregator,
        client_sharding=NamedSharding(mesh, P(axis_name)),
        **round_kwargs,
    )

    def sharded_round(state: ServerState, client_data: ClientData, key: PRNGKeyArray):
        state = shard_clients(state, mesh, axis_name=axis_name)
        client_data = shard_clients(client_data, mesh, axis_name=axis_name)
        return round_fn(state, client_data, key)

    return sharded_round
