"""Synthetic federations with a shared low-rank structure and contaminated clients.

Two levels, both deterministic functions of a ``jax.random`` key:

* :func:`shared_subspace_updates` draws the matrix-valued updates a server sees,
  one ``p x q`` matrix per client, directly.
* :func:`linear_regression` draws per-client regression data
  ``y = Θ_i^T x + ε`` (``x ∈ R^p``, ``y ∈ R^q``); :func:`least_squares` turns it
  into the preliminary local estimators ``Θ̂_i`` (ordinary least squares or ridge).

Benign clients share a column space ``U`` (``p x r``, orthonormal):

.. math::

    Θ_i = W_0 + U V_i^\\top + Δ_i, \\qquad V_i ∈ R^{q \\times r},\\;
    Δ_i = (I - U U^\\top) G_i

with ``W_0`` a common offset (the base weight), ``V_i`` client-specific
coefficients with i.i.d. ``N(0, spread²)`` entries, and an optional
off-subspace heterogeneity ``Δ_i`` (``G_i`` with i.i.d.
``N(0, heterogeneity²)`` entries) that breaks the shared structure: it is what
cross-client averaging cannot recover. ``W_0`` has i.i.d.
``N(0, offset_scale² / p)`` entries, so that each of its columns has norm about
``offset_scale``; ``U V_i^T`` has columns of norm about ``spread * sqrt(r)``.

A fraction of the clients (``round(fraction * n)`` of them, at positions drawn
from the key) is contaminated. The kinds (``kind``, one name or a tuple of names
assigned in turn to the contaminated clients):

* ``"dense"``: a model with no shared structure, ``W_0 + G_i`` with ``G_i``
  i.i.d. Gaussian of size ``E||G_i||_F = dense_scale * sqrt(r q)`` (the size of
  a benign update ``U V_i^T`` at ``spread = 1``; independent of ``spread``).
* ``"sign_flip"``: the client's own (noisy) update reflected about the base,
  ``W_0 - (X_i - W_0)``. It stays in ``W_0 + span(U)``, so no method based on
  the shared subspace can tell it from a benign client; in turn it only
  changes that client's own in-subspace coefficients, not the others' estimates.
* ``"scaled"``: the client's own noisy update scaled about the base,
  ``W_0 + attack_scale * (X_i - W_0)``: in-subspace too, but its estimation
  noise is multiplied by ``|attack_scale|``, which is what makes it detectable.
* ``"subspace"``: a coordinated group sharing another random column space
  ``U'`` (same rank, same spread): ``W_0 + U' V_i'^T``. A large enough group
  is itself a shared low-rank structure.
* ``"noise"`` (updates only): a benign update with ``noise_factor`` times the
  estimation noise, the matrix analogue of label noise.
* ``"label_noise"`` (regression only): the client's responses are randomly
  permuted across its samples, so its estimate carries no information on ``Θ_i``.

At the regression level, ``"sign_flip"`` and ``"scaled"`` are data poisoning:
responses are replaced by ``x^T W_0 - (y - x^T W_0)`` (resp.
``x^T W_0 + a (y - x^T W_0)``), which gives exactly the reflected (scaled)
update for the least-squares estimator, a linear function of ``y``.

The formulation follows the setting of CLAIR (arXiv:2605.21217), whose body is
not public: the simulation design is ours.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from clair_jax._src import validation
from clair_jax._src.linalg import batching, svd

#: Names of the client kinds; ``UpdateFederation.kind`` holds indices into this tuple.
KIND_NAMES = ("benign", "dense", "sign_flip", "scaled", "subspace", "noise", "label_noise")
UPDATE_KINDS = ("dense", "sign_flip", "scaled", "subspace", "noise")
REGRESSION_KINDS = ("dense", "sign_flip", "scaled", "subspace", "label_noise")


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


def _kinds(kind, allowed: tuple[str, ...]) -> tuple[str, ...]:
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds:
        raise ValueError("kind must name at least one contamination kind.")
    for k in kinds:
        validation.check_choice(k, "kind", allowed)
    return kinds


def _check_sizes(n, p, q, rank, fraction, samples=None) -> int:
    for name, value in (("n", n), ("p", p), ("q", q), ("rank", rank)):
        validation.check_positive_int(value, name)
    if rank > p:
        raise ValueError(f"rank must be <= p, got rank={rank} for p={p}.")
    if samples is not None:
        validation.check_positive_int(samples, "samples")
    if validation.is_traced(fraction):
        raise TypeError("fraction must be a static Python number (it fixes a count).")
    return validation.contaminated_count(fraction, n, "fraction", "n")


def _orthonormal(key, p: int, r: int, dtype) -> Array:
    """A random ``(p, r)`` matrix with orthonormal columns."""
    return _q_factor(jax.random.normal(key, (p, r), dtype))


def _q_factor(g: Array) -> Array:
    """Orthonormal Q of ``g``'s thin QR (half precision factorised in float32).

    One matrix at a time under a caller's ``jax.vmap`` on CPU
    (:func:`~clair_jax._src.linalg.svd.orthonormal_factor`), where concurrent
    batched QRs can deadlock (see ``clair_jax._src.linalg.batching``).
    """
    work = validation.working_dtype(g.dtype)
    return svd.orthonormal_factor(g.astype(work)).astype(g.dtype)


def _per_position(n: int, count: int, kinds: tuple[str, ...]) -> np.ndarray:
    """Kind code of the ``j``-th position of the random order: kinds in turn, then benign."""
    codes = [KIND_NAMES.index(kinds[j % len(kinds)]) for j in range(count)]
    return np.array(codes + [0] * (n - count), np.int32)


def _normals(key, shapes, dtype) -> list[Array]:
    """Independent standard normal arrays of the given shapes, from one draw."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = jax.random.normal(key, (sum(sizes),), dtype)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


class _Model(NamedTuple):
    basis: Array
    offset: Array
    parameters: Array  # benign model of every client
    dense: Array  # alternative models: dense and coordinated-subspace
    coordinated: Array


def _draw_model(normals, rank, spread, heterogeneity, offset_scale, dense_scale) -> _Model:
    g_u, coef, g, w0, dense, g_u2, coef2 = normals
    n, p, q = g.shape
    basis = _q_factor(g_u)
    shared = jnp.einsum("pr,nqr->npq", basis, spread * coef)
    g = heterogeneity * g
    off_subspace = g - jnp.einsum("pr,nrq->npq", basis, jnp.einsum("pr,npq->nrq", basis, g))
    w0 = offset_scale / jnp.sqrt(p) * w0
    parameters = w0[None] + shared + off_subspace
    dense = w0[None] + dense_scale * jnp.sqrt(rank / p) * dense
    other_basis = _q_factor(g_u2)
    coordinated = w0[None] + jnp.einsum("pr,nqr->npq", other_basis, spread * coef2)
    return _Model(basis, w0, parameters, dense, coordinated)


def _model_shapes(n, p, q, rank):
    return [(p, rank), (n, q, rank), (n, p, q), (p, q), (n, p, q), (p, rank), (n, q, rank)]


def _select(kind: Array, choices: dict[str, Array], default: Array) -> Array:
    out = default
    for name, value in choices.items():
        out = jnp.where((kind == KIND_NAMES.index(name))[:, None, None], value, out)
    return out


@partial(jax.jit, static_argnames=("n", "p", "q", "rank", "dtype"))
def _updates(
    key, per_position, noise, spread, heterogeneity, offset_scale, dense_scale, attack_scale,
    noise_factor, *, n, p, q, rank, dtype,
):  # fmt: skip
    k_normal, k_pick = jax.random.split(key)
    *normals, err = _normals(k_normal, _model_shapes(n, p, q, rank) + [(n, p, q)], dtype)
    model = _draw_model(normals, rank, spread, heterogeneity, offset_scale, dense_scale)
    order = jnp.argsort(jax.random.uniform(k_pick, (n,)))
    codes = jnp.zeros((n,), jnp.int32).at[order].set(per_position)
    w0 = model.offset[None]
    err = noise * err
    honest = model.parameters + err
    updates = _select(
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
    count = _check_sizes(n, p, q, rank, fraction)
    kinds = _kinds(kind, UPDATE_KINDS)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    floats = _float_args(
        dtype,
        noise=noise,
        spread=spread,
        heterogeneity=heterogeneity,
        offset_scale=offset_scale,
        dense_scale=dense_scale,
        attack_scale=attack_scale,
        noise_factor=noise_factor,
    )
    per_position = _per_position(n, count, kinds)
    return _updates(key, per_position, *floats, n=n, p=p, q=q, rank=rank, dtype=dtype)


@partial(jax.jit, static_argnames=("n", "p", "q", "rank", "samples", "dtype"))
def _regression(
    key, per_position, noise, spread, heterogeneity, offset_scale, dense_scale, attack_scale,
    *, n, p, q, rank, samples, dtype,
):  # fmt: skip
    k_normal, k_uniform = jax.random.split(key)
    shapes = _model_shapes(n, p, q, rank) + [(n, samples, p), (n, samples, q)]
    *normals, x, eps = _normals(k_normal, shapes, dtype)
    model = _draw_model(normals, rank, spread, heterogeneity, offset_scale, dense_scale)
    uniform = jax.random.uniform(k_uniform, (n, samples + 1), dtype)
    codes = jnp.zeros((n,), jnp.int32).at[jnp.argsort(uniform[:, 0])].set(per_position)
    generating = _select(
        codes, {"dense": model.dense, "subspace": model.coordinated}, model.parameters
    )
    y = jnp.einsum("nmp,npq->nmq", x, generating) + noise * eps
    base = jnp.einsum("nmp,pq->nmq", x, model.offset)
    perms = jnp.argsort(uniform[:, 1:], axis=1)
    shuffled = jnp.take_along_axis(y, perms[:, :, None], axis=1)
    responses = _select(
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
    count = _check_sizes(n, p, q, rank, fraction, samples)
    kinds = _kinds(kind, REGRESSION_KINDS)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    floats = _float_args(
        dtype,
        noise=noise,
        spread=spread,
        heterogeneity=heterogeneity,
        offset_scale=offset_scale,
        dense_scale=dense_scale,
        attack_scale=attack_scale,
    )
    per_position = _per_position(n, count, kinds)
    return _regression(
        key, per_position, *floats, n=n, p=p, q=q, rank=rank, samples=samples, dtype=dtype
    )


def _float_args(dtype, **values) -> list[Array]:
    out = []
    for name, value in values.items():
        arr = validation.as_float_array(value, name, dtype)
        validation.check_scalar(arr, name)
        if name in (
            "noise",
            "spread",
            "heterogeneity",
            "offset_scale",
            "dense_scale",
            "noise_factor",
        ):
            arr = validation.check_nonnegative(arr, name)
        else:
            arr = validation.check_finite(arr, name)
        out.append(arr)
    return out


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
