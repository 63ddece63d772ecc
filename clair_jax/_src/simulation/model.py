"""The synthetic model: a shared low-rank structure and contaminated clients.

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

References:
  CLAIR, arXiv:2605.21217 (the setting; the simulation design is this package's).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from clair_jax._src import validation
from clair_jax._src.linalg import svd

#: Names of the client kinds; ``UpdateFederation.kind`` holds indices into this tuple.
KIND_NAMES = ("benign", "dense", "sign_flip", "scaled", "subspace", "noise", "label_noise")


UPDATE_KINDS = ("dense", "sign_flip", "scaled", "subspace", "noise")


REGRESSION_KINDS = ("dense", "sign_flip", "scaled", "subspace", "label_noise")


def check_kinds(kind, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``kind`` (one name or several) as a non-empty tuple of names from ``allowed``.

    Raises:
      ValueError: no name, or a name not in ``allowed``.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds:
        raise ValueError("kind must name at least one contamination kind.")
    for k in kinds:
        validation.check_choice(k, "kind", allowed)
    return kinds


def check_sizes(n, p, q, rank, fraction, samples=None) -> int:
    """Checks the federation's sizes; returns the number of contaminated clients.

    Raises:
      ValueError: a non-positive size, ``rank > p``, or a bad ``fraction``.
      TypeError: a non-int size, or a traced ``fraction``.
    """
    for name, value in (("n", n), ("p", p), ("q", q), ("rank", rank)):
        validation.check_positive_int(value, name)
    if rank > p:
        raise ValueError(f"rank must be <= p, got rank={rank} for p={p}.")
    if samples is not None:
        validation.check_positive_int(samples, "samples")
    if validation.is_traced(fraction):
        raise TypeError("fraction must be a static Python number (it fixes a count).")
    return validation.contaminated_count(fraction, n, "fraction", "n")


def prepare(
    n, p, q, rank, fraction, kind, allowed, dtype, samples=None, **values
) -> tuple[np.ndarray, list[Array], np.dtype]:
    """Checks a federation's arguments for its jitted draw.

    Args:
      n, p, q, rank, fraction, samples: as :func:`check_sizes`.
      kind: one kind name or several, from ``allowed`` (:func:`check_kinds`).
      allowed: the kinds this federation supports.
      dtype: floating dtype, or None for JAX's default float.
      **values: the scalar parameters (:func:`float_args`), in the draw's order.

    Returns:
      ``(per_position, floats, dtype)``: the kind code of every position of the
      random order (:func:`kind_codes`), the scalars as arrays, and the dtype.

    Raises:
      ValueError, TypeError: as :func:`check_sizes`, :func:`check_kinds` and
        :func:`float_args`.
    """
    count = check_sizes(n, p, q, rank, fraction, samples)
    kinds = check_kinds(kind, allowed)
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    return kind_codes(n, count, kinds), float_args(dtype, **values), dtype


def orthonormal_basis(key, p: int, r: int, dtype) -> Array:
    """A random ``(p, r)`` matrix with orthonormal columns."""
    return q_factor(jax.random.normal(key, (p, r), dtype))


def q_factor(g: Array) -> Array:
    """Orthonormal Q of ``g``'s thin QR (half precision factorised in float32).

    One matrix at a time under a caller's ``jax.vmap`` on CPU
    (:func:`~clair_jax._src.linalg.svd.orthonormal_factor`), where concurrent
    batched QRs can deadlock (see ``clair_jax._src.linalg.batching``).
    """
    work = validation.working_dtype(g.dtype)
    return svd.orthonormal_factor(g.astype(work)).astype(g.dtype)


def kind_codes(n: int, count: int, kinds: tuple[str, ...]) -> np.ndarray:
    """Kind code of the ``j``-th position of the random order: kinds in turn, then benign."""
    codes = [KIND_NAMES.index(kinds[j % len(kinds)]) for j in range(count)]
    return np.array(codes + [0] * (n - count), np.int32)


def standard_normals(key, shapes, dtype) -> list[Array]:
    """Independent standard normal arrays of the given shapes, from one draw."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = jax.random.normal(key, (sum(sizes),), dtype)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


class Model(NamedTuple):
    """The drawn model: shared basis ``U``, offset ``W_0`` and every client's alternatives."""

    basis: Array
    offset: Array
    parameters: Array  # benign model of every client
    dense: Array  # alternative models: dense and coordinated-subspace
    coordinated: Array


def draw_model(normals, rank, spread, heterogeneity, offset_scale, dense_scale) -> Model:
    """The model of the module docstring from standard normals of :func:`model_shapes`."""
    g_u, coef, g, w0, dense, g_u2, coef2 = normals
    n, p, q = g.shape
    basis = q_factor(g_u)
    shared = jnp.einsum("pr,nqr->npq", basis, spread * coef)
    g = heterogeneity * g
    off_subspace = g - jnp.einsum("pr,nrq->npq", basis, jnp.einsum("pr,npq->nrq", basis, g))
    w0 = offset_scale / jnp.sqrt(p) * w0
    parameters = w0[None] + shared + off_subspace
    dense = w0[None] + dense_scale * jnp.sqrt(rank / p) * dense
    other_basis = q_factor(g_u2)
    coordinated = w0[None] + jnp.einsum("pr,nqr->npq", other_basis, spread * coef2)
    return Model(basis, w0, parameters, dense, coordinated)


def model_shapes(n, p, q, rank):
    """Shapes of the standard normals :func:`draw_model` consumes, in order."""
    return [(p, rank), (n, q, rank), (n, p, q), (p, q), (n, p, q), (p, rank), (n, q, rank)]


def select_by_kind(kind: Array, choices: dict[str, Array], default: Array) -> Array:
    """Per client, ``choices[name]`` where ``kind`` codes ``name``, else ``default``."""
    out = default
    for name, value in choices.items():
        out = jnp.where((kind == KIND_NAMES.index(name))[:, None, None], value, out)
    return out


def float_args(dtype, **values) -> list[Array]:
    """The scalar parameters as arrays of ``dtype``; scales must be non-negative.

    Raises:
      ValueError: a non-scalar, negative scale, or non-finite value.
      TypeError: a non-numeric value.
    """
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
