"""Per-client regression data and least-squares estimates: :func:`linear_regression`."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from clair_jax._src import validation
from clair_jax._src.linalg import batching
from clair_jax._src.simulation.model import (
    REGRESSION_KINDS,
    draw_model,
    model_shapes,
    prepare,
    select_by_kind,
    standard_normals,
)


class RegressionFederation(NamedTuple):
    """Per-client regression data (see :func:`linear_regression`).

    Attributes:
      features: ``(n, m, p)`` inputs ``x`` (rows are samples).
      responses: ``(n, m, q)`` outputs ``y`` (after any poisoning).
      parameters: ``(n, p, q)`` the benign model ``Θ_i`` of every client.
      basis: ``(p, r)`` the shared orthonormal basis ``U``.
      offset: ``(p, q)`` the common offset ``W_0``.
      contaminated: ``(n,)`` bool.
      kind: ``(n,)`` int32, index into :data:`KIND_NAMES`.
    """

    features: Float[Array, "n m p"]
    responses: Float[Array, "n m q"]
    parameters: Float[Array, "n p q"]
    basis: Float[Array, "p r"]
    offset: Float[Array, "p q"]
    contaminated: Bool[Array, " n"]
    kind: Int[Array, " n"]


@partial(jax.jit, static_argnames=("n", "p", "q", "rank", "samples", "dtype"))
def _regression(
    key, per_position, noise, spread, heterogeneity, offset_scale, dense_scale, attack_scale,
    *, n, p, q, rank, samples, dtype,
):  # fmt: skip
    k_normal, k_uniform = jax.random.split(key)
    shapes = model_shapes(n, p, q, rank) + [(n, samples, p), (n, samples, q)]
    *normals, x, eps = standard_normals(k_normal, shapes, dtype)
    model = draw_model(normals, rank, spread, heterogeneity, offset_scale, dense_scale)
    uniform = jax.random.uniform(k_uniform, (n, samples + 1), dtype)
    codes = jnp.zeros((n,), jnp.int32).at[jnp.argsort(uniform[:, 0])].set(per_position)
    generating = select_by_kind(
        codes, {"dense": model.dense, "subspace": model.coordinated}, model.parameters
    )
    y = jnp.einsum("nmp,npq->nmq", x, generating) + noise * eps
    base = jnp.einsum("nmp,pq->nmq", x, model.offset)
    perms = jnp.argsort(uniform[:, 1:], axis=1)
    shuffled = jnp.take_along_axis(y, perms[:, :, None], axis=1)
    responses = select_by_kind(
        codes,
        {
            "sign_flip": base - (y - base),
            "scaled": base + attack_scale * (y - base),
            "label_noise": shuffled,
        },
        y,
    )
    return RegressionFederation(
        x, responses, model.parameters, model.basis, model.offset, codes > 0, codes
    )


def linear_regression(
    key: Array,
    *,
    n: int,
    p: int,
    q: int,
    rank: int,
    samples: int,
    fraction: float = 0.0,
    kind: str | tuple[str, ...] = "dense",
    noise: float | Float[ArrayLike, ""] = 1.0,
    spread: float | Float[ArrayLike, ""] = 1.0,
    heterogeneity: float | Float[ArrayLike, ""] = 0.0,
    offset_scale: float | Float[ArrayLike, ""] = 1.0,
    dense_scale: float | Float[ArrayLike, ""] = 1.0,
    attack_scale: float | Float[ArrayLike, ""] = 5.0,
    dtype=None,
) -> RegressionFederation:
    """Multi-client linear regression ``y = Θ_i^T x + ε`` with shared-subspace ``Θ_i``.

    Client ``i`` draws ``samples`` inputs ``x ~ N(0, I_p)`` and responses
    ``y = Θ_i^T x + ε``, ``ε ~ N(0, noise² I_q)``; contaminated clients' data
    follow another model or are poisoned (module docstring). Pass the result to
    :func:`least_squares` for the preliminary estimates ``Θ̂_i`` (``(n, p, q)``),
    whose estimation error per entry is about ``noise / sqrt(samples - p)``.

    Args:
      key: a ``jax.random`` key.
      n: number of clients.
      p: input dimension (rows of ``Θ_i``).
      q: output dimension (columns of ``Θ_i``).
      rank: dimension of the shared column space.
      samples: samples per client ``m``.
      fraction: contaminated fraction in ``[0, 1)`` (static).
      kind: ``"dense"``, ``"sign_flip"``, ``"scaled"``, ``"subspace"``,
        ``"label_noise"``, or a tuple of them assigned in turn.
      noise: standard deviation of the response noise ``ε``.
      spread: standard deviation of the client-specific coefficients ``V_i``.
      heterogeneity: standard deviation of the off-subspace deviations ``Δ_i``.
      offset_scale: column norm of the common offset ``W_0``.
      dense_scale: size of the ``"dense"`` clients' models, in units of ``sqrt(r q)``.
      attack_scale: multiplier of ``"scaled"`` poisoning.
      dtype: floating dtype (default: JAX's default float).

    Returns:
      A :class:`RegressionFederation`.

    Examples:
      >>> import jax
      >>> data = linear_regression(jax.random.key(0), n=6, p=5, q=2, rank=1, samples=20,
      ...                          fraction=0.5, kind="label_noise")
      >>> data.features.shape, data.responses.shape, int(data.contaminated.sum())
      ((6, 20, 5), (6, 20, 2), 3)
      >>> least_squares(data.features, data.responses).shape
      (6, 5, 2)
    """
    per_position, floats, dtype = prepare(
        n, p, q, rank, fraction, kind, REGRESSION_KINDS, dtype, samples,
        noise=noise, spread=spread, heterogeneity=heterogeneity, offset_scale=offset_scale,
        dense_scale=dense_scale, attack_scale=attack_scale,
    )  # fmt: skip
    return _regression(
        key, per_position, *floats, n=n, p=p, q=q, rank=rank, samples=samples, dtype=dtype
    )


def _lstsq_solution(a, b):
    return jnp.linalg.lstsq(a, b)[0]


@jax.jit
def _least_squares(x, y, ridge):
    n, m, p = x.shape
    root = jnp.sqrt(ridge).astype(x.dtype)
    eye = jnp.broadcast_to(root * jnp.eye(p, dtype=x.dtype), (n, p, p))
    xa = jnp.concatenate([x, eye], axis=1)
    ya = jnp.concatenate([y, jnp.zeros((n, p, y.shape[2]), y.dtype)], axis=1)
    work = validation.working_dtype(x.dtype)  # half precision solved in float32
    # One client at a time on CPU (see clair_jax._src.linalg.batching).
    beta = batching.map_matrices(_lstsq_solution, xa.astype(work), ya.astype(work))
    return beta.astype(x.dtype)


def least_squares(
    features: Float[ArrayLike, "n m p"],
    responses: Float[ArrayLike, "n m q"],
    *,
    ridge: float | Float[ArrayLike, ""] = 0.0,
) -> Float[Array, "n p q"]:
    """Per-client least-squares (ridge) estimates ``Θ̂_i``.

    .. math::

        \\hat Θ_i = \\arg\\min_Θ \\|Y_i - X_i Θ\\|_F^2 + \\text{ridge}\\,\\|Θ\\|_F^2
                 = (X_i^\\top X_i + \\text{ridge}\\, I)^{-1} X_i^\\top Y_i,

    computed as the least-squares solution of the stacked system
    ``[X_i; sqrt(ridge) I] Θ = [Y_i; 0]`` (SVD-based, so ``ridge=0`` with fewer
    samples than features gives the minimum-norm solution).

    Args:
      features: ``(n, m, p)`` inputs.
      responses: ``(n, m, q)`` outputs.
      ridge: non-negative ridge penalty (traced).

    Returns:
      ``(n, p, q)`` estimates.
    """
    x = validation.as_float_array(features, "features")
    y = validation.as_float_array(responses, "responses", x.dtype)
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(
            "features and responses must have shapes (n, m, p) and (n, m, q) with the same "
            f"(n, m), got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    ridge = validation.as_float_array(ridge, "ridge", x.dtype)
    validation.check_scalar(ridge, "ridge")
    ridge = validation.check_nonnegative(ridge, "ridge")
    return _least_squares(x, y, ridge)
