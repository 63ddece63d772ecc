"""Matrix-valued client updates around a shared subspace: :func:`shared_subspace_updates`."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from clair_jax._src.simulation.model import (
    UPDATE_KINDS,
    draw_model,
    model_shapes,
    prepare,
    select_by_kind,
    standard_normals,
)


class UpdateFederation(NamedTuple):
    """Matrix-level synthetic federation (see :func:`shared_subspace_updates`).

    Attributes:
      updates: ``(n, p, q)`` what the server receives.
      parameters: ``(n, p, q)`` the benign model ``Θ_i = W_0 + U V_i^T + Δ_i``
        of every client (what an honest client ``i`` estimates): the target of
        the per-client estimation error on benign clients.
      basis: ``(p, r)`` the shared orthonormal basis ``U``.
      offset: ``(p, q)`` the common offset ``W_0``.
      contaminated: ``(n,)`` bool, true for contaminated clients.
      kind: ``(n,)`` int32, index into :data:`KIND_NAMES` (0 = benign).
    """

    updates: Float[Array, "n p q"]
    parameters: Float[Array, "n p q"]
    basis: Float[Array, "p r"]
    offset: Float[Array, "p q"]
    contaminated: Bool[Array, " n"]
    kind: Int[Array, " n"]


@partial(jax.jit, static_argnames=("n", "p", "q", "rank", "dtype"))
def _updates(
    key, per_position, noise, spread, heterogeneity, offset_scale, dense_scale, attack_scale,
    noise_factor, *, n, p, q, rank, dtype,
):  # fmt: skip
    k_normal, k_pick = jax.random.split(key)
    *normals, err = standard_normals(k_normal, model_shapes(n, p, q, rank) + [(n, p, q)], dtype)
    model = draw_model(normals, rank, spread, heterogeneity, offset_scale, dense_scale)
    order = jnp.argsort(jax.random.uniform(k_pick, (n,)))
    codes = jnp.zeros((n,), jnp.int32).at[order].set(per_position)
    w0 = model.offset[None]
    err = noise * err
    honest = model.parameters + err
    updates = select_by_kind(
        codes,
        {
            "dense": model.dense + err,
            "sign_flip": w0 - (honest - w0),
            "scaled": w0 + attack_scale * (honest - w0),
            "subspace": model.coordinated + err,
            "noise": model.parameters + noise_factor * err,
        },
        honest,
    )
    return UpdateFederation(updates, model.parameters, model.basis, model.offset, codes > 0, codes)


def shared_subspace_updates(
    key: Array,
    *,
    n: int,
    p: int,
    q: int,
    rank: int,
    fraction: float = 0.0,
    kind: str | tuple[str, ...] = "dense",
    noise: float | Float[ArrayLike, ""] = 0.0,
    spread: float | Float[ArrayLike, ""] = 1.0,
    heterogeneity: float | Float[ArrayLike, ""] = 0.0,
    offset_scale: float | Float[ArrayLike, ""] = 0.0,
    dense_scale: float | Float[ArrayLike, ""] = 1.0,
    attack_scale: float | Float[ArrayLike, ""] = 5.0,
    noise_factor: float | Float[ArrayLike, ""] = 5.0,
    dtype=None,
) -> UpdateFederation:
    """Matrix-valued client updates sharing a column space, some contaminated.

    Every client sends ``X_i = Θ_i + E_i`` (``E_i`` i.i.d. ``N(0, noise²)``, the
    preliminary estimation error) unless it is contaminated (module docstring).

    Args:
      key: a ``jax.random`` key; the whole federation is a function of it.
      n: number of clients.
      p: rows of every update (the shared column space lives in ``R^p``).
      q: columns of every update.
      rank: dimension ``r`` of the shared column space.
      fraction: contaminated fraction in ``[0, 1)``; ``round(fraction * n)``
        clients are contaminated (static: it fixes a count).
      kind: contamination kind, or a tuple of kinds assigned in turn
        (``"dense"``, ``"sign_flip"``, ``"scaled"``, ``"subspace"``, ``"noise"``).
      noise: standard deviation of the estimation error ``E_i`` per entry.
      spread: standard deviation of the client-specific coefficients ``V_i``.
      heterogeneity: standard deviation of the off-subspace deviations ``Δ_i``.
      offset_scale: column norm of the common offset ``W_0`` (0: no offset).
      dense_scale: size of ``"dense"`` contamination, in units of ``sqrt(r q)``.
      attack_scale: multiplier of ``"scaled"`` contamination.
      noise_factor: noise multiplier of ``"noise"`` contamination.
      dtype: floating dtype (default: JAX's default float).

    The float arguments are traced (``vmap`` over a noise grid works); sizes,
    ``fraction`` and ``kind`` are static.

    Returns:
      A :class:`UpdateFederation`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> fed = shared_subspace_updates(jax.random.key(0), n=10, p=8, q=3, rank=2,
      ...                               fraction=0.3)
      >>> fed.updates.shape, int(fed.contaminated.sum())
      ((10, 8, 3), 3)
      >>> benign = fed.updates[~fed.contaminated]          # noiseless: in span(U)
      >>> off = benign - fed.basis @ (fed.basis.T @ benign)
      >>> bool(jnp.abs(off).max() < 1e-5)
      True
    """
    per_position, floats, dtype = prepare(
        n, p, q, rank, fraction, kind, UPDATE_KINDS, dtype,
        noise=noise, spread=spread, heterogeneity=heterogeneity, offset_scale=offset_scale,
        dense_scale=dense_scale, attack_scale=attack_scale, noise_factor=noise_factor,
    )  # fmt: skip
    return _updates(key, per_position, *floats, n=n, p=p, q=q, rank=rank, dtype=dtype)
