"""``decompose``: low-rank + block-sparse decomposition of stacked client updates."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from clair_jax._src import validation
from clair_jax._src.linalg import sparsity as sparsity_lib
from clair_jax._src.linalg import svt as svt_lib
from clair_jax._src.solvers import problem
from clair_jax._src.solvers.adjoint import ADJOINTS, AbstractAdjoint
from clair_jax._src.solvers.admm import ADMM
from clair_jax._src.solvers.base import AbstractDecompositionSolver
from clair_jax._src.solvers.decomposition import Decomposition, solve_decomposition
from clair_jax._src.solvers.fista import FISTA

#: ``method=`` strings and the solvers they name.
SOLVERS = {"fista": FISTA, "admm": ADMM}
METHODS = tuple(SOLVERS)
DIFF_MODES = tuple(ADJOINTS)


def decompose(
    updates: Float[ArrayLike, "n p q"],
    *,
    lam_nuc: float | Float[ArrayLike, ""],
    lam_block: float | Float[ArrayLike, ""],
    method: str | AbstractDecompositionSolver = "admm",
    constrained: bool = False,
    weights: Float[ArrayLike, " n"] | None = None,
    offset: bool = False,
    sparsity: str = "block",
    tol: float = 1e-6,
    max_iter: int = 2000,
    svd: str = "auto",
    rank_cap: int | None = None,
    power_iters: int = 1,
    init: tuple[ArrayLike, ArrayLike] | Decomposition | None = None,
    diff: str | AbstractAdjoint = "implicit",
) -> Decomposition:
    """Splits stacked client updates into a low-rank and a block-sparse part.

    With ``M = [X_1, ..., X_n]`` (``p x nq``, client ``i`` owning column block
    ``i``), solves the penalised problem

    .. math::

        \\min_{L, S, c}\\; \\tfrac12 \\sum_i \\|X_i - c - L_i - S_i\\|_F^2
          + \\lambda_* \\|L\\|_* + \\lambda_S \\sum_i w_i \\|S_i\\|_F

    or, with ``constrained=True`` (noiseless data, ADMM only),
    :math:`\\min \\lambda_* \\|L\\|_* + \\lambda_S \\sum_i w_i \\|S_i\\|_F` s.t.
    :math:`X_i = c + L_i + S_i` (only the ratio of the two λ's matters there).
    ``L`` carries the shared column space, the non-zero blocks of ``S`` the
    contaminated clients, ``c`` an optional unpenalised common offset (the base
    weight every client's estimate contains). This is a block version of
    Outlier Pursuit (Xu, Caramanis & Sanghavi 2012), our reconstruction of the
    decomposition in CLAIR (arXiv:2605.21217), whose body is not public.

    λ's, weights and data are traced arguments (``vmap`` over a λ-grid,
    ``grad`` with respect to them); every other argument is static
    configuration. Gradients come from implicit differentiation at the fixed
    point (``diff="implicit"``, the solver loop is not differentiated) or from
    reverse mode through ``max_iter`` unrolled iterations (``diff="unrolled"``).
    The solution map is piecewise smooth: where a singular value of ``L`` or a
    block norm of ``S`` sits exactly at its threshold, or in the exact-recovery
    regime of the constrained form (where the multiplier is not unique), it has
    kinks, and a derivative there is one element of a generalised Jacobian.

    Args:
      updates: ``(n, p, q)`` client updates; batch more problems with ``jax.vmap``
        (on CPU the solve then runs in sequential chunks whose solver arrays fit
        a CPU cache).
        Integers become the default float; half precision (float16, bfloat16)
        is solved, and returned, in float32. Any scale the dtype holds: the
        iterations run on ``X`` divided by the power of two that brings its
        largest entry into ``[1/2, 1)``, so ``(2^k X, 2^k λ)`` gives ``2^k`` times
        the solution of ``(X, λ)``, bit for bit (the objective ``4^k`` times, ``inf``
        where that exceeds the dtype's range).
      lam_nuc: weight ``λ_* >= 0`` of the nuclear norm.
      lam_block: weight ``λ_S >= 0`` of the block norm.
      method: ``"admm"`` (the default: inexact ALM with residual-balanced
        penalty, Lin et al. 2010), ``"fista"`` (Beck & Teboulle 2009, with
        adaptive restart), or a solver object (an
        ``AbstractDecompositionSolver``, e.g. ``ADMM()`` or ``FISTA()``). ADMM
        also solves the constrained form and, in float32, reaches a ``tol``
        near rounding where FISTA can stall; :func:`clair_jax.clair` and
        :func:`clair_jax.rpca` use it.
      constrained: solve the equality-constrained (noiseless) form; needs ``"admm"``.
      weights: ``(n,)`` non-negative per-client weights ``w_i`` (default ones).
      offset: estimate an unpenalised common offset ``c`` (``(p, q)``).
      sparsity: structure of the sparse part: ``"block"`` (the default above,
        one group per client), ``"column"`` (one group per column of ``M``:
        ``sum_i w_i sum_j ||S_i[:, j]||_2``, Outlier Pursuit) or ``"entry"``
        (``sum_i w_i ||S_i||_1``, Principal Component Pursuit; see
        :func:`clair_jax.rpca`). ``lam_block`` weighs whichever norm is chosen.
      tol: relative residual at which to stop (see :class:`Decomposition`). In
        float32, ``1e-6`` is close to what rounding allows: FISTA's residual can
        stall just above it (``converged=False``); use ``method="admm"``, a looser
        ``tol`` or float64 there.
      max_iter: iteration cap (and the number of unrolled steps with
        ``diff="unrolled"``). Reaching it is reported as ``converged=False``.
      svd: factorisation backend for singular value thresholding: ``"auto"``,
        ``"full"``, ``"gram"`` or ``"rank_capped"`` (see ``clair_jax._src.linalg.svt``).
        ``"auto"`` caps the rank at 16 for matrices ``M`` (``p x nq``) whose
        smaller side is at least 128 (off TPU, not with ``diff="unrolled"``),
        continuing exactly if the cap binds; it picks an exact backend otherwise.
      rank_cap: number of singular triplets kept by ``"rank_capped"``; giving it
        with ``svd="auto"`` selects that backend. If the thresholded rank
        reaches ``rank_cap`` the cap may be binding: the solve then continues
        from where it stopped with the exact factorisation (``"full"``, or
        ``"gram"`` where ``"auto"`` would pick it; up to ``max_iter`` more
        iterations, counted in ``num_iters``). The capped rank comes from a
        subspace iteration warm-started across iterations, which can settle
        one rank short when the last singular value above the threshold nearly
        ties with the first one outside the subspace, or with kept singular
        vectors not yet converged (a kept value close to the bulk below it);
        so a converged capped solve is certified
        (``svt_capped.capped_svt_certified``: with ``Z`` the point whose SVT is ``L``
        at a minimiser, no further singular value of ``Z`` above ``τ + tol
        ||X||_F`` and ``||L - SVT_τ(Z)||_F <= 10 tol ||X||_F``, bounded by one
        Cholesky and products with the kept vectors) and continues exactly when
        the certificate fails. With
        ``diff="unrolled"`` there is no continuation: a binding cap or a failed
        certificate is reported as ``converged=False``.
      power_iters: subspace iterations per solver iteration for ``"rank_capped"``.
      init: warm start, ``(low_rank, sparse)`` or a previous :class:`Decomposition`.
      diff: a differentiation mode, ``ImplicitAdjoint()`` or ``UnrolledAdjoint()``,
        or its name: ``"implicit"`` (reverse mode: ``jax.grad``/``jax.vjp`` by the
        fixed-point VJP; forward mode, ``jax.jvp``/``jax.jacfwd``, is not
        defined for a ``custom_vjp`` and raises a TypeError) or ``"unrolled"``
        (differentiates the ``max_iter`` iterations themselves, both modes).
        Implicit derivatives are those of the minimiser, meaningful only when
        ``converged``; where the fixed-point system is singular (a solve stopped
        short of one, a solution that is not unique) they raise an error.

    Returns:
      A :class:`Decomposition`.

    Raises:
      ValueError: bad shapes, negative or non-finite λ's or weights, NaN/inf in
        ``updates``, ``tol <= 0``, unknown ``method``/``svd``/``diff`` (neither a
        name nor a solver/adjoint object), ``constrained=True`` with a solver of
        the penalised form only. Value
        checks on traced arrays raise a runtime error with the same message.
      TypeError: non-numeric arguments, or traced static configuration.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import clair_jax as cj
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> u = jnp.linalg.qr(jax.random.normal(k1, (20, 2)))[0]
      >>> benign = jnp.einsum("pr,nrq->npq", u, jax.random.normal(k2, (9, 2, 4)))
      >>> outliers = jax.random.normal(k3, (3, 20, 4))
      >>> x = jnp.concatenate([benign, outliers])
      >>> sol = cj.decompose(x, lam_nuc=1.0, lam_block=0.6, method="admm",
      ...                    constrained=True, tol=1e-5)
      >>> bool(sol.converged), int(sol.rank)
      (True, 2)
      >>> jnp.linalg.norm(sol.sparse, axis=(1, 2)) > 1e-3
      Array([False, False, False, False, False, False, False, False, False,
              True,  True,  True], dtype=bool)

    References:
      H. Xu, C. Caramanis, S. Sanghavi, "Robust PCA via Outlier Pursuit", IEEE
      Trans. Inf. Theory 58(5), 2012, arXiv:1010.4237.
      A. Beck, M. Teboulle, "A fast iterative shrinkage-thresholding algorithm",
      SIAM J. Imaging Sci. 2(1), 2009.
      Z. Lin, M. Chen, Y. Ma, "The augmented Lagrange multiplier method for exact
      recovery of corrupted low-rank matrices", 2010, arXiv:1009.5055.
    """
    solver = _solver(method)
    adjoint = _adjoint(diff)
    validation.check_choice(sparsity, "sparsity", sparsity_lib.SPARSITIES)
    constrained = validation.check_bool(constrained, "constrained")
    offset = validation.check_bool(offset, "offset")
    if constrained and not solver.solves_constrained:
        raise ValueError('constrained=True is solved by method="admm" only.')
    tol = validation.check_positive_float(tol, "tol")
    max_iter = validation.check_positive_int(max_iter, "max_iter")
    power_iters = validation.check_positive_int(power_iters, "power_iters")

    x = validation.as_factorisable(
        updates,
        "updates",
        3,
        "(n, p, q) (clients, rows, cols)",
        "batch several problems with jax.vmap",
    )
    n, p, q = x.shape
    backend, rank_cap = svt_lib.resolve_backend(
        (p, n * q), svd, rank_cap, x.dtype, unrolled=adjoint.unrolled
    )

    x = validation.check_finite(x, "updates")
    lam_nuc = _lambda(lam_nuc, "lam_nuc", x.dtype)
    lam_block = _lambda(lam_block, "lam_block", x.dtype)
    if weights is None:
        w = jnp.ones((n,), x.dtype)
    else:
        w = validation.as_float_array(weights, "weights", x.dtype)
        if w.shape != (n,):
            raise ValueError(
                f"weights must have shape (n,) = ({n},) for updates of shape {(n, p, q)}, "
                f"got shape {tuple(w.shape)}."
            )
        w = validation.check_nonnegative(w, "weights")

    init_l, init_s = _initial_point(init, x)
    options = problem.Options(
        constrained=bool(constrained),
        offset=bool(offset),
        tol=tol,
        max_iter=max_iter,
        backend=backend,
        rank_cap=rank_cap,
        power_iters=power_iters,
        sparsity=sparsity,
    )
    data = problem.Data(x, lam_nuc, lam_block, w)
    return solve_decomposition(solver, adjoint, options, data, init_l, init_s)


def _solver(method) -> AbstractDecompositionSolver:
    """The solver ``method`` names (or is)."""
    if isinstance(method, AbstractDecompositionSolver):
        return method
    return SOLVERS[validation.check_choice(method, "method", METHODS)]()


def _adjoint(diff) -> AbstractAdjoint:
    """The differentiation mode ``diff`` names (or is)."""
    if isinstance(diff, AbstractAdjoint):
        return diff
    return ADJOINTS[validation.check_choice(diff, "diff", DIFF_MODES)]()


def _lambda(value, name: str, dtype) -> Array:
    lam = validation.as_float_array(value, name, dtype)
    validation.check_scalar(lam, name)
    return validation.check_nonnegative(lam, name)


def _initial_point(init, x: Array) -> tuple[Array, Array]:
    if init is None:
        return jnp.zeros_like(x), jnp.zeros_like(x)
    if isinstance(init, Decomposition):
        init = (init.low_rank, init.sparse)
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise TypeError("init must be (low_rank, sparse) or a Decomposition.")
    out = []
    for name, arr in zip(("init low_rank", "init sparse"), init, strict=True):
        arr = validation.as_float_array(arr, name, x.dtype)
        if arr.shape != x.shape:
            raise ValueError(
                f"{name} must have the shape of updates {tuple(x.shape)}, got {tuple(arr.shape)}."
            )
        out.append(validation.check_finite(arr, name))
    return out[0], out[1]
