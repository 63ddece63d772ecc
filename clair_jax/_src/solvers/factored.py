"""Factored server math: LoRA updates ``X_i = B_i A_i`` in small exact coordinates.

A client's LoRA update ``X_i = B_i A_i`` (``B_i`` ``p x r``, ``A_i`` ``r x q``)
never needs to be formed as a ``p x q`` matrix on the server. Every update lies
in the column space of the stacked ``[B_1 .. B_n]`` (``p x nr``) and in the row
space of its own ``A_i``; with orthonormal bases of those spaces the whole
stacked matrix ``M = [X_1 .. X_n]`` is

.. math::

    M = U \\, [C_1 V_1^\\top, \\dots, C_n V_n^\\top]
      = U \\, C \\, \\mathrm{blockdiag}(V_1, \\dots, V_n)^\\top,
    \\qquad C_i = (U^\\top B_i)(A_i V_i),

``U`` (``p x k``, ``k = min(p, nr)``) from a thin QR factorisation of the
stacked ``B``'s (``U^T B_i`` is a column block of its ``R`` factor), ``V_i``
(``q x m``, ``m = min(q, r)``) from the QR factorisation of ``A_i^T``. The
coordinates ``C_i`` (``k x m``) are formed from the factors alone. With a common
offset every update must share one right basis: ``V`` of all the ``A``'s row
spaces (``q x min(q, nr)``, from the QR factorisation of the stacked ``A``'s).

**Why the small problem is the dense one.** ``U`` and the block-diagonal
``blockdiag(V_i)`` have orthonormal columns, so the map ``Y ↦ U Y_i V_i^T``
(block by block) is an isometry onto its range for the Frobenius norm of every
block, hence for the group norm ``Σ_i w_i ||S_i||_F`` and the data term, and it
preserves singular values of the stacked matrix, hence the nuclear norm
``||L||_*``. Conversely let ``Π`` be the orthogonal projection
``Y_i ↦ U U^T Y_i V_i V_i^T`` (common ``V`` with an offset, applied to ``c``
too). For any candidate ``(L, S, c)`` of the dense problem
``1/2 Σ ||X_i - c - L_i - S_i||_F^2 + λ_* ||L||_* + λ_S Σ w_i ||S_i||_F``:
the data lie in the range (``Π X_i = X_i``), so each residual becomes
``Π(X_i - c - L_i - S_i)``, whose norm is no larger (Pythagoras); ``||Π S_i||_F
<= ||S_i||_F``; and ``[Π L_i] = (U U^T) L blockdiag(V_i V_i^T)`` has
``||·||_* <= ||L||_*`` (``||P Y Q||_* <= ||P||_2 ||Y||_* ||Q||_2`` for
projections ``P``, ``Q``). Projecting never increases the objective, so a
minimiser lies in the range, where the dense objective equals the small one
on the coordinates: the small minimiser, lifted back as
``L_i = U Lc_i V_i^T`` (and ``S_i``, ``c`` likewise), *is* a dense minimiser
(the minimiser when it is unique, as it is for the penalised problem with a
unique SVT fixed point). Only the block norm is preserved: the column
(``sparsity="column"``) and entry norms are not invariant under the right
rotations ``V_i``, and are not offered here.

Cost: one thin QR of ``p x nr`` and ``n`` of ``q x r`` (with an offset one of
``q x nr``), then a decomposition of an ``(n, k, m)`` problem, against
``(n, p, q)`` densely: for ``p = q = 1024``, ``n = 16``, ``r = 8`` the stacked
matrix shrinks from ``1024 x 16384`` to ``128 x 128``.

References:
  H. Xu, C. Caramanis, S. Sanghavi, "Robust PCA via Outlier Pursuit", IEEE
  Trans. Inf. Theory 58(5), 2012, arXiv:1010.4237.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src import validation
from clair_jax._src.linalg import batching
from clair_jax._src.lora.types import LoRAFactors
from clair_jax._src.solvers.decompose import decompose
from clair_jax._src.solvers.decomposition import Decomposition

_HIGHEST = jax.lax.Precision.HIGHEST


class FactoredCoordinates(NamedTuple):
    """Orthonormal bases of stacked LoRA updates and the updates' coordinates in them.

    ``X_i = left @ coords[i] @ right_i.T`` with ``right_i = right[i]`` (one basis
    per client) or ``right`` (one common basis, ``right.ndim == 2``).

    Attributes:
      left: ``(p, k)`` orthonormal columns ``U`` spanning every ``B_i``'s columns.
      right: ``(n, q, m)`` orthonormal ``V_i`` (row space of ``A_i``), or
        ``(q, m)`` orthonormal ``V`` (row spaces of all the ``A``'s), or None when
        not formed (:func:`factored_coordinates`' ``right_frame``).
      coords: ``(n, k, m)`` coordinates ``C_i = U^T X_i V_i``.
      left_coef: ``(n, k, r)`` ``U^T B_i``.
      right_coef: ``(n, r, m)`` ``A_i V_i`` (``A_i V``).
    """

    left: Float[Array, "p k"]
    right: Array | None
    coords: Float[Array, "n k m"]
    left_coef: Float[Array, "n k r"]
    right_coef: Float[Array, "n r m"]


@batching.sequential_on_cpu
def thin_qr(z: Array) -> tuple[Array, Array]:
    """Thin QR ``z = Q R`` (batched under vmap as ``batching.sequential_on_cpu`` says)."""
    q, r = jnp.linalg.qr(z)
    return q, r


@batching.sequential_on_cpu
def thin_r(z: Array) -> Array:
    """``R`` of the thin QR ``z = Q R`` (LAPACK's ``geqrf`` alone, ``Q`` never formed)."""
    return jnp.linalg.qr(z, mode="r")


def stack_columns(b: Float[Array, "n p r"]) -> Float[Array, "p nr"]:
    """``[B_1 .. B_n]``: the clients' ``B`` factors side by side."""
    n, p, r = b.shape
    return jnp.transpose(b, (1, 0, 2)).reshape(p, n * r)


def left_basis(b: Float[Array, "n p r"]) -> tuple[Array, Array]:
    """``(U, U^T B)``: orthonormal ``U`` (``p x min(p, nr)``) of the stacked ``B``'s, and
    the ``(n, k, r)`` coordinates ``U^T B_i`` (the column blocks of the ``R`` factor).

    Householder QR: ``U`` has orthonormal columns to working precision also when
    the ``B``'s are rank deficient (clients sharing one ``B``, zero factors); the
    surplus columns then carry zero coordinates.
    """
    n, p, r = b.shape
    u, rr = thin_qr(stack_columns(b))
    k = u.shape[1]
    return u, jnp.transpose(rr.reshape(k, n, r), (1, 0, 2))


def common_right_basis(a: Float[Array, "n r q"]) -> tuple[Array, Array]:
    """``(V_A, A V_A)``: orthonormal ``V_A`` (``q x min(q, nr)``) of the rows of all the
    ``A``'s, and the ``(n, r, s)`` coefficients ``A_i V_A`` (blocks of the ``R`` factor
    of the stacked ``A``'s transposed)."""
    n, r, q = a.shape
    v, t = thin_qr(a.reshape(n * r, q).T)  # A_stack^T = V_A T: (q, s), (s, nr)
    return v, jnp.transpose(t.reshape(v.shape[1], n, r), (1, 2, 0))


def factored_coordinates(
    factors: LoRAFactors, *, common_right: bool = False, right_frame=None, checked: bool = False
) -> FactoredCoordinates:
    """Exact small coordinates of the updates ``X_i = B_i A_i`` (module docstring).

    Args:
      factors: ``LoRAFactors(B (n, p, r), A (n, r, q))``; half precision is
        factorised in float32.
      common_right: one right basis ``V`` for all clients (row space of the
        stacked ``A``'s, ``q x min(q, nr)``), as a common offset needs; else
        one ``V_i`` per client (``q x min(q, r)``).
      right_frame: ``(V_A, A V_A)`` of :func:`common_right_basis` of these ``A``'s,
        when the caller has it, with ``common_right=False``: then client ``i``'s
        ``R`` factor comes from the QR ``(A_i V_A)^T = W_i R_i`` (``min(q, nr) x r``)
        instead of that of the ``q x r`` ``A_i^T``: ``A_i^T = (V_A W_i) R_i`` with
        orthonormal ``V_A W_i``, so ``C_i = (U^T B_i) R_i^T`` are exact coordinates
        (in the frame ``V_i = V_A W_i``, which is not formed: ``right`` is None).
      checked: ``factors`` are :func:`working_factors`' output, used as they are.
        Checking checked arrays again is not free: besides the pass over them, the
        check waits for what the caller computed from them (``right_frame``'s QR),
        which XLA:CPU would otherwise run side by side with the ``B``'s.

    Returns:
      A :class:`FactoredCoordinates`.

    Raises:
      ValueError: ``right_frame`` with ``common_right=True``, bad factors.
    """
    if right_frame is not None and common_right:
        raise ValueError("right_frame serves the per-client frames: give common_right=False.")
    b, a = factors if checked else working_factors(factors)
    u, beta = left_basis(b)
    if common_right:
        v, alpha = common_right_basis(a)  # (q, m), A_i V: (n, r, m)
    elif right_frame is not None:
        t = batching.map_matrices(thin_r, jnp.swapaxes(right_frame[1], 1, 2))  # (n, m, r)
        v, alpha = None, jnp.swapaxes(t, 1, 2).astype(beta.dtype)
    else:
        v, t = batching.map_matrices(thin_qr, jnp.swapaxes(a, 1, 2))  # (n, q, m), (n, m, r)
        alpha = jnp.swapaxes(t, 1, 2)
    coords = jnp.einsum("nkr,nrm->nkm", beta, alpha, precision=_HIGHEST)
    return FactoredCoordinates(u, v, coords, beta, alpha)


def working_factors(factors) -> tuple[Array, Array]:
    """``(B, A)`` checked (shapes, finite) in the working dtype (half precision to float32).

    Raises:
      TypeError: ``factors`` not a pair.
      ValueError: mismatched shapes, NaN or inf.
    """
    if not (isinstance(factors, tuple) and len(factors) == 2):
        raise TypeError(f"factors must be LoRAFactors(B, A), got {type(factors).__name__}.")
    b = validation.as_float_array(factors[0], "B")
    a = validation.as_float_array(factors[1], "A")
    if b.ndim != 3 or a.ndim != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
        raise ValueError(
            "factors must hold B (n, p, r) and A (n, r, q) with the same n and r, got "
            f"B {tuple(b.shape)} and A {tuple(a.shape)}."
        )
    work = validation.working_dtype(jnp.result_type(b.dtype, a.dtype))
    b, a = b.astype(work), a.astype(work)
    return validation.check_finite(b, "B"), validation.check_finite(a, "A")


def lift(left: Array, coords: Array, right: Array) -> Array:
    """Dense ``(n, p, q)`` blocks ``left @ coords_i @ right_i^T`` (for tests and small problems).

    ``right`` is ``(n, q, m)`` (one basis per client) or ``(q, m)`` (common).
    """
    if right.ndim == 2:
        right = jnp.broadcast_to(right, (coords.shape[0], *right.shape))
    return jnp.einsum("pk,nkm,nqm->npq", left, coords, right, precision=_HIGHEST)


class FactoredDecomposition(NamedTuple):
    """:func:`decompose_factored`'s solution, in coordinates.

    ``L_i = left @ decomposition.low_rank[i] @ right_i^T`` and likewise ``S_i``;
    the offset (with ``offset=True``) is ``left @ decomposition.offset @ right^T``.
    :func:`lift` turns any of them into dense blocks.

    Attributes:
      left: ``(p, k)`` orthonormal ``U``.
      right: ``(n, q, m)`` per-client ``V_i``, or ``(q, m)`` common ``V``.
      decomposition: the :class:`clair_jax.Decomposition` of the ``(n, k, m)``
        coordinates (objective, residual and iteration count are the dense
        problem's: the lift is an isometry).
    """

    left: Float[Array, "p k"]
    right: Array
    decomposition: Decomposition

    def low_rank_dense(self) -> Array:
        """The dense ``(n, p, q)`` low-rank blocks ``L_i`` (small problems only)."""
        return lift(self.left, self.decomposition.low_rank, self.right)

    def sparse_dense(self) -> Array:
        """The dense ``(n, p, q)`` blocks ``S_i`` (small problems only)."""
        return lift(self.left, self.decomposition.sparse, self.right)

    def offset_dense(self) -> Array | None:
        """The dense ``(p, q)`` offset ``c``, or None."""
        c = self.decomposition.offset
        if c is None:
            return None
        return jnp.matmul(jnp.matmul(self.left, c, precision=_HIGHEST), self.right.T)

    def block_norms(self) -> Array:
        """``(n,)`` ``||S_i||_F`` (equal to the coordinates' block norms)."""
        return jnp.sqrt(jnp.sum(self.decomposition.sparse**2, axis=(1, 2)))


def decompose_factored(
    factors: LoRAFactors,
    *,
    lam_nuc,
    lam_block,
    offset: bool = False,
    **kwargs,
) -> FactoredDecomposition:
    """:func:`clair_jax.decompose` of the updates ``B_i A_i`` without forming them.

    Solves the same problem as ``decompose(B @ A, lam_nuc=..., lam_block=...,
    offset=offset, **kwargs)`` on the ``(n, min(p, nr), min(q, r))`` coordinates
    of :func:`factored_coordinates` (with an offset, ``(n, min(p, nr), min(q,
    nr))`` in a common right basis) and returns the solution in factored form.
    The module docstring proves that the lifted small minimiser is the dense
    minimiser.

    Args:
      factors: ``LoRAFactors(B (n, p, r), A (n, r, q))``.
      lam_nuc: ``λ_*`` (as :func:`clair_jax.decompose`; same value as densely).
      lam_block: ``λ_S``.
      offset: estimate a common offset ``c`` (uses a common right basis).
      **kwargs: passed to :func:`clair_jax.decompose` (``method``, ``weights``,
        ``constrained``, ``tol``, ``max_iter``, ``svd``, ``init`` in
        coordinates, ...). ``sparsity`` must be ``"block"`` (the only
        rotation-invariant group norm).

    Returns:
      A :class:`FactoredDecomposition`.

    Raises:
      ValueError: mismatched factor shapes, NaN/inf, a ``sparsity`` other than
        ``"block"``, and whatever :func:`clair_jax.decompose` raises.
    """
    if kwargs.get("sparsity", "block") != "block":
        raise ValueError(
            "decompose_factored solves sparsity='block' only: column and entry norms are "
            f"not invariant under the right bases, got sparsity={kwargs['sparsity']!r}."
        )
    fc = factored_coordinates(factors, common_right=bool(offset))
    sol = decompose(fc.coords, lam_nuc=lam_nuc, lam_block=lam_block, offset=offset, **kwargs)
    return FactoredDecomposition(fc.left, fc.right, sol)
