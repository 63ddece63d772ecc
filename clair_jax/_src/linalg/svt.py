"""Singular value thresholding with interchangeable factorisation backends.

The proximal map of ``tau * ||.||_*`` (the nuclear norm) is singular value
thresholding:

.. math::

    \\operatorname{SVT}_\\tau(Z) = U \\max(\\Sigma - \\tau, 0) V^\\top,
    \\qquad Z = U \\Sigma V^\\top.

One factorisation per solver iteration is the cost that matters, so three
backends compute it:

* ``"full"``: the thin SVD of ``Z`` (:func:`~clair_jax._src.linalg.svt_exact.svt_full`),
  the most accurate.
* ``"gram"``: the eigendecomposition of the smaller Gram matrix
  (:func:`~clair_jax._src.linalg.svt_exact.svt_gram`). Cheaper for a large
  aspect ratio, but singular values below about ``sqrt(eps) * sigma_max`` are
  not resolved.
* ``"rank_capped"``: a warm-started subspace iteration with ``rank_cap`` columns
  (:mod:`~clair_jax._src.linalg.svt_capped`), exact at a fixed point while the
  thresholded rank stays below ``rank_cap``.

``"auto"`` resolves to ``"rank_capped"`` when a ``rank_cap`` is given or
:func:`auto_rank_cap` sets one (the solvers then continue exactly whenever the
cap binds or the rank is not certified); otherwise to ``"gram"`` on TPU and for
float64 matrices of aspect ratio at least 2, and to ``"full"`` elsewhere (float32
stays on ``"full"``: the Gram route resolves a singular value ``sigma`` only to
about ``eps * sigma_max**2 / sigma``).

References:
  J.-F. Cai, E. J. Candès, Z. Shen, "A singular value thresholding algorithm for
  matrix completion", SIAM J. Optim. 20(4), 2010, arXiv:0810.3286.
"""

from __future__ import annotations

import numbers
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src import validation
from clair_jax._src.linalg.svt_capped import svt_rank_capped
from clair_jax._src.linalg.svt_exact import svt_full, svt_gram

SvdBackend = Literal["auto", "full", "gram", "rank_capped"]


SVD_BACKENDS = ("auto", "full", "gram", "rank_capped")


def select_backend(
    shape: tuple[int, int], backend: str = "auto", rank_cap: int | None = None, dtype=None
) -> str:
    """Resolves ``backend`` (possibly ``"auto"``) to a concrete backend name.

    Args:
      shape: ``(rows, cols)`` of the matrix to threshold.
      backend: one of ``"auto"``, ``"full"``, ``"gram"``, ``"rank_capped"``.
      rank_cap: number of singular triplets kept by ``"rank_capped"``.
      dtype: dtype of the matrix (default: float32 rules).

    Returns:
      The backend used: ``"full"``, ``"gram"`` or ``"rank_capped"``.

    Raises:
      ValueError: unknown backend, or ``"rank_capped"`` without a valid ``rank_cap``.
      TypeError: a ``rank_cap`` that is not an int.
    """
    if backend not in SVD_BACKENDS:
        raise ValueError(f"svd must be one of {SVD_BACKENDS}, got {backend!r}.")
    small, large = sorted(shape)
    if rank_cap is not None:
        if isinstance(rank_cap, bool) or not isinstance(rank_cap, numbers.Integral):
            raise TypeError(f"rank_cap must be an int, got {type(rank_cap).__name__}.")
        rank_cap = int(rank_cap)
        if not 1 <= rank_cap <= small:
            raise ValueError(
                f"rank_cap must be an int in [1, {small}] for a matrix of shape {shape}, "
                f"got {rank_cap!r}."
            )
    if backend == "rank_capped" and rank_cap is None:
        raise ValueError('svd="rank_capped" needs rank_cap=<int>.')
    if backend != "auto":
        return backend
    if rank_cap is not None:
        return "rank_capped"
    if jax.default_backend() == "tpu":
        return "gram"
    if dtype is not None and jnp.dtype(dtype) == jnp.float64 and large >= 2 * small:
        return "gram"
    return "full"


#: Smaller side from which ``"auto"`` caps the rank (off TPU).
AUTO_CAP_MIN_SIZE = 128


#: The rank cap ``"auto"`` uses there.
AUTO_RANK_CAP = 16


def auto_rank_cap(shape: tuple[int, int], backend: str = "auto") -> int | None:
    """The rank cap ``backend="auto"`` uses for a ``shape`` matrix, or None (exact backends).

    Args:
      shape: ``(rows, cols)`` of the matrix.
      backend: the requested backend.

    Returns:
      ``AUTO_RANK_CAP`` when ``backend == "auto"``, the smaller side is at least
      ``AUTO_CAP_MIN_SIZE`` and the default JAX backend is not a TPU; else None.

    Examples:
      >>> import jax
      >>> auto_rank_cap((256, 512)) if jax.default_backend() != "tpu" else 16
      16
      >>> auto_rank_cap((64, 1280)) is None
      True
    """
    if backend != "auto" or min(shape) < AUTO_CAP_MIN_SIZE or jax.default_backend() == "tpu":
        return None
    return AUTO_RANK_CAP


def resolve_backend(
    shape: tuple[int, int],
    backend: str = "auto",
    rank_cap: int | None = None,
    dtype=None,
    *,
    unrolled: bool = False,
) -> tuple[str, int | None]:
    """The factorisation a solver really uses: ``(backend, rank_cap)``, ``"auto"`` resolved.

    Without a given ``rank_cap``, ``"auto"`` takes :func:`auto_rank_cap`'s
    (except for ``unrolled`` solves, which have no exact continuation), then
    :func:`select_backend` picks the backend.

    Args:
      shape: ``(rows, cols)`` of the matrix.
      backend: the requested backend.
      rank_cap: a given rank cap, or None.
      dtype: dtype of the matrix.
      unrolled: whether the solve is differentiated through its iterations.

    Returns:
      ``(backend, rank_cap)``: a concrete backend and the cap (None unless capped).

    Raises:
      ValueError: as :func:`select_backend`.
      TypeError: as :func:`select_backend`.
    """
    if rank_cap is None and not unrolled:
        rank_cap = auto_rank_cap(shape, backend)
    used = select_backend(shape, backend, rank_cap, dtype)  # validates rank_cap
    return used, None if rank_cap is None else int(rank_cap)


def singular_value_threshold(
    z: Float[Array, "p m"],
    tau,
    *,
    backend: str = "full",
    basis: Array | None = None,
    power_iters: int = 1,
) -> tuple[Float[Array, "p m"], Array, Array | None]:
    """Proximal map of ``tau * ||.||_*`` at ``z``.

    Args:
      z: matrix to threshold (half precision is thresholded, and returned, in
        float32).
      tau: non-negative threshold (scalar, may be traced: a negative traced
        ``tau`` raises at run time).
      backend: a concrete backend (see :func:`select_backend`).
      basis: ``(cols, rank_cap)`` warm-start basis, ``"rank_capped"`` only.
      power_iters: subspace iterations per call, ``"rank_capped"`` only.

    Returns:
      ``(svt, rank, new_basis)``: the thresholded matrix, the number of singular
      values above ``tau`` (int32), and the updated warm-start basis (``None``
      except for ``"rank_capped"``).

    Raises:
      ValueError: ``z`` not 2-D, ``tau`` negative, non-finite or not a scalar,
        an unknown ``backend``, a missing or misshapen ``basis``.
      TypeError: non-numeric ``z`` or ``tau``.

    Examples:
      >>> import jax.numpy as jnp
      >>> out, rank, _ = singular_value_threshold(jnp.diag(jnp.array([3.0, 1.0])), 2.0)
      >>> out
      Array([[1., 0.],
             [0., 0.]], dtype=float32)
      >>> int(rank)
      1
    """
    validation.check_choice(backend, "backend", ("full", "gram", "rank_capped"))
    z = validation.as_factorisable(z, "z", 2, "(p, m)", "threshold a batch with jax.vmap")
    tau = validation.as_float_array(tau, "tau", z.dtype)
    validation.check_scalar(tau, "tau")
    tau = validation.check_nonnegative(tau, "tau")
    if backend == "rank_capped":
        if basis is None:
            raise ValueError('backend="rank_capped" needs a basis (cols, rank_cap).')
        basis = validation.as_float_array(basis, "basis", z.dtype)
        if basis.ndim != 2 or basis.shape[0] != z.shape[1] or basis.shape[1] > min(z.shape):
            raise ValueError(
                f"basis must have shape (cols, rank_cap) = ({z.shape[1]}, k) with "
                f"1 <= k <= {min(z.shape)} for z of shape {tuple(z.shape)}, got "
                f"{tuple(basis.shape)}."
            )
    return svt(z, tau, backend=backend, basis=basis, power_iters=power_iters)


def svt(z, tau, *, backend: str, basis=None, power_iters: int = 1):
    """:func:`singular_value_threshold` without argument checks (the solvers' inner call).

    Raises:
      ValueError: an unknown ``backend``, or ``"rank_capped"`` without a ``basis``.
    """
    if backend == "full":
        out, rank = svt_full(z, tau)
        return out, rank.astype(jnp.int32), None
    if backend == "gram":
        out, rank = svt_gram(z, tau)
        return out, rank.astype(jnp.int32), None
    if backend == "rank_capped":
        if basis is None:
            raise ValueError('backend="rank_capped" needs a basis (cols, rank_cap).')
        out, rank, new_basis = svt_rank_capped(z, tau, basis, power_iters)
        return out, rank.astype(jnp.int32), new_basis
    raise ValueError(f"backend must be 'full', 'gram' or 'rank_capped', got {backend!r}.")
