"""Splitting a leading axis over devices: one-axis meshes, padding to a multiple of them.

``jax.sharding`` splits an array's leading axis only into equal pieces, so ``k``
items (a round's participants, a server's modules of one shape) on a mesh axis of
``d`` devices are padded to ``ceil(k / d) * d``: the extra lanes repeat the last
item (a valid computation, so no NaN or special case) and their results are
dropped (``out[:k]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int


def line_mesh(devices: Sequence[jax.Device], axis_name: str) -> jax.sharding.Mesh:
    """A one-dimensional mesh named ``axis_name`` over ``devices``, in their order.

    Raises:
      ValueError: an empty or repeated device list, or an empty axis name.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name must be a non-empty string, got {axis_name!r}.")
    devices = list(devices)
    if not devices:
        raise ValueError("devices must not be empty.")
    if len({d.id for d in devices}) != len(devices):
        raise ValueError(f"devices must not repeat a device, got {devices}.")
    return jax.sharding.Mesh(np.array(devices, dtype=object), (axis_name,))


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
