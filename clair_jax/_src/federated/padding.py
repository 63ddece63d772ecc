"""Padding a client axis to a multiple of the devices that split it.

``jax.sharding`` splits an array's leading axis only into equal pieces, so a
round over ``k`` participants on a mesh axis of ``d`` devices trains
``ceil(k / d) * d`` clients: the extra lanes repeat the last participant (a
valid computation, so no NaN or special case) and their results are dropped
before the aggregation, which sees the ``k`` real participants only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


def client_parts(sharding: jax.sharding.Sharding) -> int:
    """How many pieces ``sharding`` cuts an array's leading axis into.

    Args:
      sharding: a sharding of arrays along their leading axis (e.g.
        ``NamedSharding(mesh, P("clients"))``; its other dimensions replicated).

    Returns:
      The number of distinct shards of dimension 0 (the mesh axis size).
    """
    devices = len(sharding.device_set)
    return devices // int(sharding.shard_shape((devices,))[0])


def padded_size(k: int, parts: int) -> int:
    """The smallest multiple of ``parts`` that is ``>= k``."""
    return -(-k // parts) * parts


def pad_index(k: int, parts: int) -> Int[Array, " m"]:
    """Indices ``0, ..., k - 1, k - 1, ..., k - 1`` of length :func:`padded_size`.

    Gathering a length-``k`` leading axis with them repeats its last entry in
    the padding lanes, whose outputs the caller drops (``out[:k]``).
    """
    return jnp.minimum(jnp.arange(padded_size(k, parts), dtype=jnp.int32), k - 1)
