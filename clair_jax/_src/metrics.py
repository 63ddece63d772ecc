"""Evaluation metrics: detection of contaminated clients, distance between subspaces."""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from clair_jax._src import validation


class DetectionMetrics(NamedTuple):
    """Quality of a flagged set against the truth (see :func:`detection_metrics`).

    Attributes:
      precision: ``TP / (TP + FP)``; 1 when nothing is flagged.
      recall: ``TP / (TP + FN)``; 1 when nothing is to be found.
      f1: ``2 TP / (2 TP + FP + FN)``; 1 when nothing is flagged and nothing is to
        be found.
      true_positives: int32 ``TP``.
      false_positives: int32 ``FP``.
      false_negatives: int32 ``FN``.
    """

    precision: Float[Array, "*batch"]
    recall: Float[Array, "*batch"]
    f1: Float[Array, "*batch"]
    true_positives: Int[Array, "*batch"]
    false_positives: Int[Array, "*batch"]
    false_negatives: Int[Array, "*batch"]


def _ratio(num: Array, den: Array) -> Array:
    """``num / den`` as floats, 1 where ``den == 0`` (nothing to find, nothing flagged)."""
    num, den = num.astype(jnp.result_type(float)), den.astype(jnp.result_type(float))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


def detection_metrics(
    flagged: Bool[ArrayLike, "*batch n"], truth: Bool[ArrayLike, "*batch n"]
) -> DetectionMetrics:
    """Precision, recall and F1 of a set of flagged clients.

    Counts run over the last axis; leading axes (seeds, modules) are kept, so
    one call scores a whole batch. Empty denominators follow one convention:
    a score with nothing to get wrong is perfect (1.0), e.g. precision when
    nothing is flagged, recall when no client is contaminated. Jittable.

    Args:
      flagged: bool ``(..., n)``, the clients declared contaminated (for
        :func:`clair_jax.clair`, ``~result.collaborative``).
      truth: bool ``(..., n)``, the contaminated clients.

    Returns:
      A :class:`DetectionMetrics`.

    Raises:
      ValueError: shapes differ.

    Examples:
      >>> import jax.numpy as jnp
      >>> m = detection_metrics(jnp.array([True, True, False, False]),
      ...                       jnp.array([True, False, True, False]))
      >>> float(m.precision), float(m.recall), float(m.f1)
      (0.5, 0.5, 0.5)
    """
    flagged = jnp.asarray(flagged)
    truth = jnp.asarray(truth)
    if flagged.shape != truth.shape:
        raise ValueError(
            f"flagged and truth must have the same shape, got {tuple(flagged.shape)} "
            f"and {tuple(truth.shape)}."
        )
    if flagged.ndim == 0:
        raise ValueError("flagged and truth must have a client axis (shape (..., n)).")
    flagged, truth = flagged.astype(bool), truth.astype(bool)
    tp = jnp.sum(flagged & truth, axis=-1, dtype=jnp.int32)
    fp = jnp.sum(flagged & ~truth, axis=-1, dtype=jnp.int32)
    fn = jnp.sum(~flagged & truth, axis=-1, dtype=jnp.int32)
    return DetectionMetrics(
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
    )


def subspace_distance(a: Float[ArrayLike, "p r"], b: Float[ArrayLike, "p s"]) -> Array:
    """``||P_a - P_b||_F`` for orthonormal bases ``a`` and ``b`` (zero columns allowed).

    Zero columns (the padding of :attr:`clair_jax.ClairResult.basis`) do not
    contribute to ``P = B B^T``. For two ``r``-dimensional subspaces it equals
    ``sqrt(2) ||sin Θ||_F`` with ``Θ`` the principal angles; bases of different
    dimensions ``r, s`` are at least ``sqrt(|r - s|)`` apart.

    Raises:
      ValueError: ``a`` and ``b`` not ``(p, r)`` and ``(p, s)`` matrices, or
        columns that are not orthonormal (or zero) to ``10 sqrt(eps)`` (a
        runtime error when traced): the formula means nothing for other bases.

    Examples:
      >>> import jax.numpy as jnp
      >>> e = jnp.eye(3)
      >>> float(subspace_distance(e[:, :2], e[:, :2]))
      0.0
      >>> round(float(subspace_distance(e[:, :1], e[:, 1:2])) ** 2, 6)
      2.0
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be (p, r) and (p, s) bases, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    a = _check_orthonormal(validation.as_float_array(a, "a"), "a")
    b = _check_orthonormal(validation.as_float_array(b, "b", a.dtype), "b")
    # ||P_a - P_b||^2 = ||(I - P_b) a||^2 + ||(I - P_a) b||^2 (both r_a + r_b - 2||a^T b||^2),
    # without forming p x p and without the cancellation of the trace formula.
    cross = a.T @ b
    return jnp.sqrt(jnp.sum((a - b @ cross.T) ** 2) + jnp.sum((b - a @ cross) ** 2))


def _check_orthonormal(basis: Array, name: str) -> Array:
    """Rejects columns that are neither orthonormal nor zero (``basis^T basis`` vs 0/1 diagonal)."""
    gram = basis.T @ basis
    diag = jnp.diagonal(gram)
    target = jnp.diag(jnp.clip(jnp.round(diag), 0.0, 1.0))
    error = jnp.max(jnp.abs(gram - target), initial=0.0)
    tol = 10 * math.sqrt(float(jnp.finfo(basis.dtype).eps))
    msg = f"{name} must have orthonormal (or zero) columns"
    if validation.is_traced(error):
        return eqx.error_if(basis, error > tol, msg + ".")
    if float(error) > tol:
        raise ValueError(
            f"{msg}: max |{name}^T {name} - I| = {float(error):.2e} (shape {tuple(basis.shape)})."
        )
    return basis
