"""``rpca``: classic Robust PCA (Principal Component Pursuit) on a plain matrix.

Candès, Li, Ma & Wright (2011) recover a low-rank matrix from gross, sparse
corruption by solving

.. math::

    \\min_{L, S}\\; \\|L\\|_* + \\lambda \\|S\\|_1 \\quad \\text{s.t.}\\quad L + S = M,

with ``lambda = 1 / sqrt(max(m, N))`` for ``M`` of shape ``(m, N)``. This is
the constrained form of :func:`clair_jax.decompose` with a single block and
entry-wise sparsity; ``sparsity="column"`` gives Outlier Pursuit (whole
corrupted columns). The same solver loop, transforms and diagnostics apply.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from clair_jax._src import validation
from clair_jax._src.solvers.decompose import decompose


class RobustPCA(NamedTuple):
    """Solution of :func:`rpca`.

    Attributes:
      low_rank: ``(m, N)`` low-rank part ``L``.
      sparse: ``(m, N)`` sparse part ``S`` (``M = L + S`` up to ``residual``).
      lam: the ``λ`` used.
      num_iters: int32, ADMM iterations run.
      converged: bool, whether both relative residuals fell below ``tol``.
      residual: final ``max(primal, dual)`` residual relative to ``||M||_F``.
      objective: ``||L||_* + λ ||S||_1`` (column norms for ``"column"``).
      rank: int32, rank of ``L`` at the last thresholding.
    """

    low_rank: Float[Array, "m N"]
    sparse: Float[Array, "m N"]
    lam: Float[Array, ""]
    num_iters: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    objective: Float[Array, ""]
    rank: Int[Array, ""]


def rpca(
    matrix: Float[ArrayLike, "m N"],
    *,
    lam: float | Float[ArrayLike, ""] | None = None,
    sparsity: str = "entry",
    method: str = "admm",
    tol: float = 1e-7,
    max_iter: int = 1000,
    svd: str = "auto",
    rank_cap: int | None = None,
    power_iters: int = 1,
    diff: str = "implicit",
) -> RobustPCA:
    """Robust PCA: splits ``M`` into low-rank ``L`` plus sparse ``S``.

    Solves Principal Component Pursuit,
    :math:`\\min \\|L\\|_* + \\lambda \\|S\\|_1` s.t. :math:`L + S = M`, by ADMM /
    inexact ALM (Lin, Chen & Ma 2010) with residual balancing, through
    :func:`clair_jax.decompose` (``constrained=True``, one block). Works under
    ``jax.jit`` and ``jax.vmap`` (a batch of matrices); ``jax.grad`` with
    respect to ``matrix`` and ``lam`` by implicit differentiation.

    Args:
      matrix: ``(m, N)`` data matrix ``M`` (half precision is solved, and
        returned, in float32).
      lam: weight of the sparse term; default ``1 / sqrt(max(m, N))``, the
        choice under which Candès et al. prove exact recovery (entry-wise
        sparsity). With ``sparsity="column"`` the right value depends on the
        fraction and size of the outlier columns: pass one (a λ-grid is one
        ``jax.vmap`` away); the entry-wise default is used otherwise.
      sparsity: ``"entry"`` (ℓ1, PCP) or ``"column"`` (Outlier Pursuit).
      method: ``"admm"`` (the only solver of the constrained problem).
      tol: relative primal and dual residual at which to stop.
      max_iter: iteration cap; reaching it is reported as ``converged=False``.
      svd: ``"auto"``, ``"full"``, ``"gram"`` or ``"rank_capped"`` (see
        :func:`clair_jax.decompose`).
      rank_cap: singular triplets kept by ``"rank_capped"`` (selects it under
        ``"auto"``); when the cap binds or the capped rank is not certified,
        the solve continues with the exact factorisation (as
        :func:`clair_jax.decompose`), so the result is the true minimiser
        (``diff="unrolled"`` has no continuation and reports
        ``converged=False`` there).
      power_iters: subspace iterations per step for ``"rank_capped"``.
      diff: ``"implicit"`` or ``"unrolled"`` gradients.

    Returns:
      A :class:`RobustPCA`.

    Raises:
      ValueError: ``matrix`` not 2-D or empty, NaN/inf entries, ``lam``
        negative or non-finite, unknown ``sparsity``/``method``/``svd``, and the
        errors of :func:`clair_jax.decompose`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import clair_jax as cj
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> low = jax.random.normal(k1, (40, 2)) @ jax.random.normal(k2, (2, 50))
      >>> spikes = 10.0 * (jax.random.uniform(k3, (40, 50)) < 0.05)
      >>> res = cj.rpca(low + spikes, tol=1e-6)
      >>> bool(res.converged), int(res.rank)
      (True, 2)
      >>> bool(jnp.linalg.norm(res.low_rank - low) < 1e-3 * jnp.linalg.norm(low))
      True

    References:
      E. J. Candès, X. Li, Y. Ma, J. Wright, "Robust principal component
      analysis?", J. ACM 58(3), 2011, arXiv:0912.3599.
      H. Xu, C. Caramanis, S. Sanghavi, "Robust PCA via Outlier Pursuit", 2012,
      arXiv:1010.4237.
      Z. Lin, M. Chen, Y. Ma, "The augmented Lagrange multiplier method for exact
      recovery of corrupted low-rank matrices", 2010, arXiv:1009.5055.
    """
    validation.check_choice(sparsity, "sparsity", ("entry", "column"))
    if method != "admm":
        raise ValueError(
            f'method must be "admm" (the constrained problem has no FISTA form), got {method!r}.'
        )
    m = validation.as_factorisable(matrix, "matrix", 2, "(m, N)", "batch with jax.vmap")
    m = validation.check_finite(m, "matrix")
    if lam is None:
        lam = 1.0 / math.sqrt(max(m.shape))
    lam = validation.as_float_array(lam, "lam", m.dtype)
    validation.check_scalar(lam, "lam")
    lam = validation.check_nonnegative(lam, "lam")
    sol = decompose(
        m[None],
        lam_nuc=jnp.ones((), m.dtype),
        lam_block=lam,
        method="admm",
        constrained=True,
        sparsity=sparsity,
        tol=tol,
        max_iter=max_iter,
        svd=svd,
        rank_cap=rank_cap,
        power_iters=power_iters,
        diff=diff,
    )
    return RobustPCA(
        low_rank=sol.low_rank[0],
        sparse=sol.sparse[0],
        lam=lam,
        num_iters=sol.num_iters,
        converged=sol.converged,
        residual=sol.residual,
        objective=sol.objective,
        rank=sol.rank,
    )
