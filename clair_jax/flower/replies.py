"""The nodes' train replies of a Flower round: checked, given a slot, stacked.

:class:`~clair_jax.flower.AdapterStrategy` reads every train reply with
:func:`read_content` (the adapter, against the modules, shapes and dtypes the
server expects, and the aggregation weight), gives it a client slot with
:func:`claim_slot`, and stacks the valid replies on the client axis with
:func:`stack_rows` before the aggregator runs. A reply that does not fit raises
``ValueError`` saying why, and the strategy leaves it out of the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flwr.app import MetricRecord, RecordDict

from clair_jax._src.lora.types import Adapters
from clair_jax.flower.serialization import arrays_to_adapters


class Reply(NamedTuple):
    """A valid train reply.

    Attributes:
      adapter: the adapter the node trained.
      weight: its aggregation weight (finite, ``>= 0``).
      node_id: the Flower node that sent it.
    """

    adapter: Adapters
    weight: float
    node_id: int


def row(tree, i: int):
    """Row ``i`` of every leaf of a stacked pytree, as NumPy."""
    return jax.tree.map(lambda x: np.asarray(x[i]), tree)


def stack(trees: list) -> Any:
    """The pytrees stacked leaf by leaf on a new leading axis, as NumPy."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def read_content(
    content: RecordDict, *, like: Adapters, arrayrecord_key: str, weighted_by_key: str
) -> tuple[Adapters, float, MetricRecord]:
    """The adapter, the weight and the metrics of a train reply's content.

    Args:
      content: the reply's ``RecordDict``.
      like: an adapter of the expected modules, shapes and dtypes.
      arrayrecord_key: the content key of the adapter.
      weighted_by_key: the metric holding the aggregation weight.

    Returns:
      ``(adapter, weight, metrics)``, ``metrics`` the reply's first
      ``MetricRecord`` (empty when it has none).

    Raises:
      ValueError: no such ``ArrayRecord``, an adapter that does not fit ``like``
        or holds a non-finite factor, a weight missing, not a number, negative
        or non-finite.
    """
    if arrayrecord_key not in content.array_records:
        raise ValueError(f"no ArrayRecord {arrayrecord_key!r}")
    metrics = next(iter(content.metric_records.values()), MetricRecord())
    adapter = arrays_to_adapters(content.array_records[arrayrecord_key], like=like)
    if not all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(adapter)):
        raise ValueError("a non-finite factor")
    weight = metrics.get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"metric {weighted_by_key!r} missing or not a number")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"metric {weighted_by_key!r} = {weight} is not finite and >= 0")
    return adapter, float(weight), metrics


def claim_slot(
    named,
    node_id: int,
    *,
    known: Mapping[int, int],
    taken: dict[int, int],
    num_clients: int,
    client_key: str,
) -> int:
    """The client slot of a reply, recorded in ``taken``.

    Args:
      named: the slot the reply names (its ``client_key`` metric), else the
        node's slot from an earlier round, else None.
      node_id: the replying node.
      known: node id to slot, of the nodes seen in earlier rounds.
      taken: slot to node id, of the replies read this round (updated).
      num_clients: the number of slots.
      client_key: the metric naming the slot (for messages).

    Returns:
      ``named``, or the first slot neither ``known`` nor ``taken`` when it is None.

    Raises:
      ValueError: no free slot, a slot that is not an int in ``[0, num_clients)``,
        or one already taken this round.
    """
    slot = named
    if slot is None:
        used = set(known.values()) | set(taken)
        slot = next((i for i in range(num_clients) if i not in used), None)
        if slot is None:
            raise ValueError(f"no free client slot of {num_clients}")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < num_clients:
        raise ValueError(f"slot {client_key!r} = {slot!r} not in [0, {num_clients})")
    if slot in taken:
        raise ValueError(f"slot {slot} already taken this round by node {taken[slot]}")
    taken[slot] = node_id
    return slot


def stack_rows(
    replies: Mapping[int, Reply], slots: list[int], clients: Adapters, sent: Mapping[int, Adapters]
) -> tuple[Adapters, Adapters, np.ndarray]:
    """The aggregator's stacked inputs, one row per slot of ``slots``.

    A slot with a reply holds the node's adapter, the adapter the node was sent
    (its start) and its weight; a slot without one holds its current adapter as
    both (an update of zero) with weight zero.

    Args:
      replies: slot to valid reply.
      slots: the slots to stack, in order.
      clients: ``(num_clients, ...)`` the adapter every slot starts from.
      sent: node id to the adapter it was sent this round.

    Returns:
      ``(clients, starts, weights)``: stacked adapters, stacked starts and the
      ``float32`` weights.
    """
    rows, starts, weights = [], [], []
    for i in slots:
        if i in replies:
            reply = replies[i]
            rows.append(reply.adapter)
            starts.append(sent[reply.node_id])
            weights.append(reply.weight)
        else:
            old = row(clients, i)
            rows.append(old)
            starts.append(old)
            weights.append(0.0)
    return stack(rows), stack(starts), np.asarray(weights, np.float32)
