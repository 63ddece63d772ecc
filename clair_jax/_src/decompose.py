"""``decompose``: low-rank + block-sparse decomposition of stacked client updates."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from clair_jax._src import admm, fista, problem, prox, validation
from clair_jax._src import sparsity as sparsity_lib
from clair_jax._src import svd as svd_lib
from clair_jax._src.implicit import attach_fixed_point
from clair_jax._src.scaling import times_power_of_two, working_exponent

METHODS = ("fista", "admm")
DIFF_MODES = ("implicit", "unrolled")


class Decomposition(NamedTuple):
    """Solution of :func:`decompose`.

    Attributes:
      low_rank: ``(n, p, q)``, the blocks ``L_i`` of the low-rank part.
      sparse: ``(n, p, q)``, the blocks ``S_i`` (non-zero = flagged clients).
      offset: ``(p, q)`` common offset ``c``, or ``None`` when ``offset=False``.
      num_iters: int32, iterations run.
      converged: bool, whether the residual fell below ``tol`` within ``max_iter``
        (for ``svd="rank_capped"`` with ``diff="unrolled"``, also that the rank
        stayed below ``rank_cap`` and the rank certificate held).
      residual: final relative residual (FISTA: fixed-point residual; ADMM:
        ``max(primal, dual)``), both relative to ``||X||_F`` (with ``offset``,
        to the centred blocks' ``||X - X̄||_F``: the offset absorbs the rest).
      objective: objective value at the returned point.
      rank: int32, rank of ``[L_1 .. L_n]`` at the last iteration's thresholding.
    """

    low_rank: Float[Array, "n p q"]
    sparse: Float[Array, "n p q"]
    offset: Float[Array, "p q"] | None
    num_iters: Int[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    objective: Float[Array, ""]
    rank: Int[Array, ""]


def _prox_grad_fixed_point(options, z, data):
    low_rank, sparse = z
    new_l, new_s, _, _ = problem.prox_grad_map(data, low_rank, sparse, options)
    return new_l, new_s


def _admm_fixed_point(options, z, params):
    data, mu = params
    low_rank, sparse, offset, dual = z
    if offset is None:  # no offset: keep it out of the fixed-point variable
        offset = jnp.zeros_like(sparse[0])
    state = admm.AdmmState(
        low_rank=low_rank,
        sparse_plus_noise=sparse,  # the constrained form: N = 0
        offset=offset,
        dual=dual,
        mu=mu,
        num_iters=jnp.zeros((), jnp.int32),
        primal_residual=mu,
        dual_residual=mu,
        rank=jnp.zeros((), jnp.int32),
        basis=None,
    )
    low_rank, sparse, new_offset, dual, _, _ = admm.sweep(data, options, state, mu)
    return low_rank, sparse, new_offset if options.offset else None, dual


@partial(jax.jit, static_argnums=(0,))
def _solve(options: problem.Options, data: problem.Data, init_l, init_s) -> Decomposition:
    n, p, q = data.updates.shape
    dtype = data.updates.dtype
    # The iterations run on X 2^-e, λ 2^-e (see working_exponent); the results are
    # scaled back at the end.
    first = working_exponent(data.updates)
    x = times_power_of_two(data.updates, -first)
    mean = None
    if options.offset:
        # The unpenalised offset absorbs any common shift of the blocks: solve for the
        # centred blocks X_i - X̄ (same L and S, offset c - X̄) and add X̄ back. A large
        # common part (a base weight W_0) would otherwise set a rounding floor on every
        # iteration's residual relative to the centred scale (float32: eps ||X|| /
        # ||X - X̄||, above tol=1e-6 once W_0 is some 10x the clients' differences).
        # Centred after scaling (the sum of the blocks cannot overflow), then scaled
        # again to the centred blocks' size.
        mean = jnp.mean(x, axis=0)
        x = x - mean[None]
    second = working_exponent(x)  # 0 without an offset
    exponent = first + second
    data = data._replace(
        updates=times_power_of_two(x, -second),
        lam_nuc=times_power_of_two(data.lam_nuc, -exponent),
        lam_block=times_power_of_two(data.lam_block, -exponent),
    )
    init_l = times_power_of_two(init_l, -exponent)
    init_s = times_power_of_two(init_s, -exponent)
    basis = None
    if options.backend == "rank_capped":
        basis = svd_lib.initial_basis((p, n * q), options.rank_cap, dtype)
    inner = data if options.unrolled else jax.lax.stop_gradient(data)
    # The continuation after a binding cap factorises exactly (no warm-started basis).
    exact = options._replace(
        backend=svd_lib.select_backend((p, n * q), dtype=dtype)
        if options.backend == "rank_capped"
        else options.backend
    )

    # Implicit differentiation linearises the fixed-point map with the full SVD,
    # whose JVP (svd._svt_wide) stays finite at repeated or zero singular values
    # (exactly low-rank or zero data), where the Gram route's eigh JVP does not.
    differentiable = options._replace(backend="full")
    solver = fista if options.method == "fista" else admm

    def run(inner, init_l, init_s, basis):
        state = solver.solve(inner, options, init_l, init_s, basis)
        saturated = jnp.zeros((), bool)
        if options.backend == "rank_capped" and not options.unrolled:
            # A full cap means singular values beyond it may exceed the threshold: the
            # fixed point reached need not be the minimiser; nor need it be when the
            # subspace missed a singular value just above the threshold (a near-tie
            # with the first one outside it) or its kept vectors have not settled,
            # which the certificate catches. Carry on
            # from it with the exact factorisation (no iteration at all otherwise).
            converged = _residual(options, state) < options.tol
            saturated = jnp.logical_or(
                state.rank >= options.rank_cap,
                jnp.logical_and(converged, ~_capped_solve_certified(inner, options, state, solver)),
            )
            # ADMM goes on with the penalty it reached (no new spectral-norm estimate).
            carry_on = {"mu": state.mu} if options.method == "admm" else {}
            more = solver.solve(
                inner,
                exact,
                state.low_rank,
                solver.sparse_part(inner, options, state),
                None,
                skip=~saturated,
                **carry_on,
            )
            more = more._replace(basis=state.basis, num_iters=state.num_iters + more.num_iters)
            state = jax.tree.map(lambda a, b: jnp.where(saturated, a, b), more, state)
        return state, saturated

    if options.unrolled:
        state, saturated = run(inner, init_l, init_s, basis)
    else:
        # The solver is never differentiated here (implicit differentiation below),
        # so it may batch its own way: see _cache_sized_batches.
        start = jax.lax.stop_gradient((init_l, init_s))
        state, saturated = _cache_sized_batches(run)(inner, *start, basis)
    low_rank, sparse = state.low_rank, solver.sparse_part(inner, options, state)
    residual = _residual(options, state)
    if options.method == "fista":
        dual = mu = offset = None
    else:
        offset, dual, mu = state.offset, state.dual, state.mu

    if not options.unrolled:
        if options.constrained:
            low_rank, sparse, offset, dual = attach_fixed_point(
                partial(_admm_fixed_point, differentiable),
                (low_rank, sparse, offset if options.offset else None, dual),
                (data, jax.lax.stop_gradient(mu)),
            )
        else:
            low_rank, sparse = attach_fixed_point(
                partial(_prox_grad_fixed_point, differentiable), (low_rank, sparse), data
            )
    converged = residual < options.tol
    if options.backend == "rank_capped" and options.unrolled:
        # Unrolled solves have no exact continuation: a full cap, or one whose rank
        # the certificate does not prove, is not converged.
        converged = jnp.logical_and(converged, state.rank < options.rank_cap)
        converged = jnp.logical_and(
            converged, _capped_solve_certified(inner, options, state, solver)
        )
    if not options.offset:
        offset = None
    elif not options.constrained:
        offset = problem.optimal_offset(data, low_rank, sparse)
    nuclear = None
    if options.backend == "rank_capped":
        # The last capped factorisation left L's rows in the span of its basis: the
        # nuclear norm needs a p x rank_cap SVD, not a full one (unless the exact
        # continuation ran, which kept the old basis).
        nuclear = svd_lib.nuclear_norm_in_row_space(
            prox.blocks_to_matrix(low_rank), jax.lax.stop_gradient(state.basis), saturated
        )
    sol = rescaled(
        Decomposition(
            low_rank=low_rank,
            sparse=sparse,
            offset=offset,
            num_iters=state.num_iters,
            converged=converged,
            residual=residual,
            objective=problem.objective(data, low_rank, sparse, offset, options, nuclear),
            rank=state.rank,
        ),
        exponent,
    )
    if mean is None:
        return sol
    return sol._replace(offset=sol.offset + times_power_of_two(mean, first))


def _residual(options: problem.Options, state) -> Array:
    """The stopping residual of a solver state (ADMM: the larger of its two)."""
    if options.method == "fista":
        return state.residual
    return jnp.maximum(state.primal_residual, state.dual_residual)


#: A converged rank-capped solve is accepted when its capped SVT at the solution is
#: certified exact to within this many ``tol ||X||_F`` (:func:`svd.capped_svt_certified`).
CAPPED_ERROR_FACTOR = 10.0


def _capped_solve_certified(data: problem.Data, options: problem.Options, state, solver) -> Array:
    """Whether a rank-capped solve's last SVT is proved close to the exact one.

    At a minimiser ``L = SVT_tau(Z)`` (``solver.svt_argument``). The certificate
    (:func:`svd.capped_svt_certified`) proves that no singular value of ``Z``
    outside the kept ones exceeds ``tau`` by more than ``tol ||X||_F`` and that
    ``||L - SVT_tau(Z)||_F <= CAPPED_ERROR_FACTOR tol ||X||_F``: the capped
    factorisation can settle a rank short, or with kept singular vectors not yet
    converged, while the solver's own residual is already below ``tol``.
    """
    z, tau = solver.svt_argument(data, options, state)
    scale = problem.data_scale(data)
    margin = jax.lax.stop_gradient(options.tol * scale)
    z = jax.lax.stop_gradient(prox.blocks_to_matrix(z))
    low_rank = jax.lax.stop_gradient(prox.blocks_to_matrix(state.low_rank))
    basis = jax.lax.stop_gradient(state.basis)
    return svd_lib.capped_svt_certified(
        z,
        jax.lax.stop_gradient(tau),
        basis,
        state.rank,
        low_rank,
        margin,
        CAPPED_ERROR_FACTOR * margin,
    )


def rescaled(sol: Decomposition, exponent: Array) -> Decomposition:
    """``sol`` of ``(X 2^-e, λ 2^-e)`` turned into that of ``(X, λ)``.

    The parts ``L``, ``S``, ``c`` are multiplied by ``2^e``, the objective by
    ``2^{2e}`` (:func:`times_power_of_two`: exact, with no factor ``2^e`` formed);
    the residual (relative), the iteration count and the rank stay as they are.
    """
    return sol._replace(
        low_rank=times_power_of_two(sol.low_rank, exponent),
        sparse=times_power_of_two(sol.sparse, exponent),
        offset=None if sol.offset is None else times_power_of_two(sol.offset, exponent),
        objective=times_power_of_two(sol.objective, 2 * exponent),
    )


def decompose(
    updates: Float[ArrayLike, "n p q"],
    *,
    lam_nuc: float | Float[ArrayLike, ""],
    lam_block: float | Float[ArrayLike, ""],
    method: str = "admm",
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
    diff: str = "implicit",
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
        a CPU cache, 2 MiB each, faster than one lockstep vmap: the README's
        batch benchmark).
        Integers become the default float; half precision (float16, bfloat16)
        is solved, and returned, in float32. Any scale the dtype holds: the
        iterations run on ``X`` divided by the power of two that brings its
        largest entry into ``[1/2, 1)``, so ``(2^k X, 2^k λ)`` gives ``2^k`` times
        the solution of ``(X, λ)``, bit for bit (the objective ``4^k`` times, ``inf``
        where that exceeds the dtype's range).
      lam_nuc: weight ``λ_* >= 0`` of the nuclear norm.
      lam_block: weight ``λ_S >= 0`` of the block norm.
      method: ``"admm"`` (the default: inexact ALM with residual-balanced
        penalty, Lin et al. 2010) or ``"fista"`` (Beck & Teboulle 2009, with
        adaptive restart). ADMM is the faster of the two at every size the
        README's benchmark measures (``benchmarks/solver_scaling.py``), reaches ``tol=1e-6``
        in float32 where FISTA can stall (see ``tol``), and also solves the
        constrained form; :func:`clair_jax.clair` and :func:`clair_jax.rpca`
        use it too.
      constrained: solve the equality-constrained (noiseless) form; needs ``"admm"``.
      weights: ``(n,)`` non-negative per-client weights ``w_i`` (default ones).
      offset: estimate an unpenalised common offset ``c`` (``(p, q)``).
      sparsity: structure of the sparse part: ``"block"`` (the default above,
        one group per client), ``"column"`` (one group per column of ``M``:
        ``sum_i w_i sum_j ||S_i[:, j]||_2``, Outlier Pursuit) or ``"entry"``
        (``sum_i w_i ||S_i||_1``, Principal Component Pursuit; see
        :func:`clair_jax.rpca`). ``lam_block`` weighs whichever norm is chosen.
      tol: relative residual at which to stop (see :class:`Decomposition`).
        In float32, ``1e-6`` is close to what rounding allows: on exactly
        low-rank updates (products ``B_i A_i`` of rank-4 LoRA factors, 8
        clients, ``64 x 64``, at :func:`clair_jax.clair`'s default λ's, with
        and without ``offset``) FISTA's residual stalled near ``1.5e-6`` in 17
        of 20 problems (``converged=False`` at ``max_iter``) where ADMM
        converged in all 20 and float64 FISTA in about 500 iterations. One
        float32 FISTA step from the float64 optimum (rounded to float32)
        already moves it by ``9.6e-7`` relative there: the floor is in the
        float32 evaluation of the step, not in the method's convergence. Use
        ``method="admm"``, a looser ``tol`` or float64 there.
      max_iter: iteration cap (and the number of unrolled steps with
        ``diff="unrolled"``). Reaching it is reported as ``converged=False``.
      svd: factorisation backend for singular value thresholding: ``"auto"``,
        ``"full"``, ``"gram"`` or ``"rank_capped"`` (see ``clair_jax._src.svd``).
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
        (``svd.capped_svt_certified``: with ``Z`` the point whose SVT is ``L``
        at a minimiser, no further singular value of ``Z`` above ``τ + tol
        ||X||_F`` and ``||L - SVT_τ(Z)||_F <= 10 tol ||X||_F``, bounded by one
        Cholesky and products with the kept vectors, about 0.7 ms in float32 at
        ``256 x 512``) and continues exactly when the certificate fails. With
        ``diff="unrolled"`` there is no continuation: a binding cap or a failed
        certificate is reported as ``converged=False``.
      power_iters: subspace iterations per solver iteration for ``"rank_capped"``.
      init: warm start, ``(low_rank, sparse)`` or a previous :class:`Decomposition`.
      diff: ``"implicit"`` (reverse mode: ``jax.grad``/``jax.vjp`` by the
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
        ``updates``, ``tol <= 0``, unknown ``method``/``svd``/``diff``. Value
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
    validation.check_choice(method, "method", METHODS)
    validation.check_choice(diff, "diff", DIFF_MODES)
    validation.check_choice(sparsity, "sparsity", sparsity_lib.SPARSITIES)
    constrained = validation.check_bool(constrained, "constrained")
    offset = validation.check_bool(offset, "offset")
    if constrained and method != "admm":
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
    backend, rank_cap = svd_lib.resolve_backend(
        (p, n * q), svd, rank_cap, x.dtype, unrolled=diff == "unrolled"
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
        method=method,
        constrained=bool(constrained),
        offset=bool(offset),
        tol=tol,
        max_iter=max_iter,
        backend=backend,
        rank_cap=rank_cap,
        power_iters=power_iters,
        unrolled=diff == "unrolled",
        sparsity=sparsity,
    )
    return _solve(options, problem.Data(x, lam_nuc, lam_block, w), init_l, init_s)


#: Bytes of one ``(n, p, q)`` array per problem a ``vmap`` chunk may hold on CPU.
CPU_CHUNK_BYTES = 2 * 1024 * 1024


def _cache_sized_batches(fn):
    """``fn`` whose ``jax.vmap`` on CPU runs in sequential, cache-sized chunks.

    On CPU one ``vmap`` over many large problems keeps every solver array for
    the whole batch (64 problems of 256 x 512 in float64: 64 MB per array) and
    each iteration streams them from main memory. Batched this way, the problems
    run ``k`` at a time (``jax.lax.map(..., batch_size=k)``, each chunk still
    vmapped), with ``k`` such that one ``(k, n, p, q)`` array fits in
    :data:`CPU_CHUNK_BYTES` (2 MiB, a CPU cache): measured on 2 cores, 64
    problems of 256 x 512 by ADMM in 4.2 s (2 at a time) against 7.3-7.6 s as
    one lockstep vmap (README).
    Small problems (``k`` >= the batch) and other backends, where one vmap is
    the fast path, are batched as usual. The result is the same either way;
    only the order of the work changes. Not differentiable (``custom_vmap``):
    used for the forward solve only.
    """
    if jax.default_backend() != "cpu":
        return fn
    batched_fn = jax.custom_batching.custom_vmap(fn)

    @batched_fn.def_vmap
    def rule(axis_size, in_batched, *args):
        args = jax.tree.map(
            lambda a, b: a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a))),
            args,
            tuple(in_batched),
        )
        data = args[0]
        per_problem = data.updates[0].size * data.updates.dtype.itemsize
        chunk = max(1, CPU_CHUNK_BYTES // per_problem)
        if chunk >= axis_size:
            out = jax.vmap(fn)(*args)
        else:
            out = jax.lax.map(lambda a: fn(*a), args, batch_size=chunk)
        return out, jax.tree.map(lambda _: True, out)

    return batched_fn


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
