"""The jitted decomposition solve, for any solver and adjoint.

What every method shares is written once here: the power-of-two scaling and
centring of the data, the generic loop (:func:`loop.iterate`), the exact
continuation and the certificate of a rank-capped solve, the derivatives (the
adjoint object) and the :class:`Decomposition` returned.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from clair_jax._src.linalg import prox, svt_capped
from clair_jax._src.linalg import svt as svt_lib
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent
from clair_jax._src.solvers import problem
from clair_jax._src.solvers.adjoint import AbstractAdjoint
from clair_jax._src.solvers.base import AbstractDecompositionSolver, continue_state
from clair_jax._src.solvers.loop import iterate


class Decomposition(NamedTuple):
    """Solution of :func:`decompose`.

    Attributes:
      low_rank: ``(n, p, q)``, the blocks ``L_i`` of the low-rank part.
      sparse: ``(n, p, q)``, the blocks ``S_i`` (non-zero = flagged clients).
      offset: ``(p, q)`` common offset ``c``, or ``None`` when ``offset=False``.
      num_iters: int32, iterations run.
      converged: bool, whether the solver's stopping rule held within ``max_iter``
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


#: Bytes of one ``(n, p, q)`` array per problem a ``vmap`` chunk may hold on CPU.
CPU_CHUNK_BYTES = 2 * 1024 * 1024


def cache_sized_batches(fn):
    """``fn`` whose ``jax.vmap`` on CPU runs in sequential, cache-sized chunks.

    On CPU one ``vmap`` over many large problems keeps every solver array for
    the whole batch and each iteration streams them from main memory. Batched
    this way, the problems run ``k`` at a time (``jax.lax.map(..., batch_size=k)``,
    each chunk still vmapped), with ``k`` such that one ``(k, n, p, q)`` array
    fits in :data:`CPU_CHUNK_BYTES` (a CPU cache). Small problems (``k`` >= the
    batch) and other backends, where one vmap is the fast path, are batched as
    usual. The result is the same either way; only the order of the work
    changes. Not differentiable (``custom_vmap``): used for the forward solve only.
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


@partial(jax.jit, static_argnums=(0, 1, 2))
def solve_decomposition(
    solver: AbstractDecompositionSolver,
    adjoint: AbstractAdjoint,
    options: problem.Options,
    data: problem.Data,
    init_l: Array,
    init_s: Array,
) -> Decomposition:
    """Solves the problem of ``data`` from ``(init_l, init_s)``.

    Args:
      solver: the method (static, hashable).
      adjoint: the differentiation mode (static, hashable).
      options: static configuration, already checked (:func:`clair_jax.decompose`).
      data: the traced data and λ's.
      init_l: ``(n, p, q)`` starting low-rank part.
      init_s: ``(n, p, q)`` starting sparse part.

    Returns:
      The :class:`Decomposition` of ``data``, in its scale.
    """
    n, p, q = data.updates.shape
    dtype = data.updates.dtype
    unrolled = adjoint.unrolled
    # The iterations run on X 2^-e, λ 2^-e (see working_exponent); the results are
    # scaled back at the end.
    first = working_exponent(data.updates)
    x = times_power_of_two(data.updates, -first)
    mean = None
    if options.offset:
        # The unpenalised offset absorbs any common shift of the blocks: solve for the
        # centred blocks X_i - X̄ (same L and S, offset c - X̄) and add X̄ back, so that
        # a large common part (a base weight W_0) sets no rounding floor on the
        # residual relative to the centred scale. Centred after scaling (the sum of
        # the blocks cannot overflow), then scaled again to the centred blocks' size.
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
    capped = options.backend == "rank_capped"
    basis = None
    if capped:
        basis = svt_capped.initial_basis((p, n * q), options.rank_cap, dtype)
    inner = data if unrolled else jax.lax.stop_gradient(data)
    # The continuation after a binding cap factorises exactly (no warm-started basis).
    exact = options._replace(
        backend=svt_lib.select_backend((p, n * q), dtype=dtype) if capped else options.backend
    )
    # Implicit differentiation linearises the fixed-point map with the full SVD,
    # whose JVP (svt_exact.svt_full) stays finite at repeated or zero singular values
    # (exactly low-rank or zero data), where the Gram route's eigh JVP does not.
    differentiable = options._replace(backend="full")

    def run(inner, init_l, init_s, basis):
        state = solver.init(inner, options, init_l, init_s, basis)
        state = iterate(solver, inner, options, state, unrolled=unrolled)
        saturated = jnp.zeros((), bool)
        if capped and not unrolled:
            # A full cap means singular values beyond it may exceed the threshold: the
            # fixed point reached need not be the minimiser; nor need it be when the
            # subspace missed a singular value just above the threshold or its kept
            # vectors have not settled, which the certificate catches. Carry on from
            # it with the exact factorisation (no iteration at all otherwise).
            converged = solver.terminate(inner, options, state)[1]
            saturated = jnp.logical_or(
                state.rank >= options.rank_cap,
                jnp.logical_and(converged, ~_capped_solve_certified(solver, inner, options, state)),
            )
            parts = solver.postprocess(inner, options, state)
            more = solver.init(inner, exact, state.low_rank, parts.sparse, None, previous=state)
            more = iterate(solver, inner, exact, more, unrolled=False, skip=~saturated)
            state = continue_state(state, more, saturated)
        return state, saturated

    if unrolled:
        state, saturated = run(inner, init_l, init_s, basis)
    else:
        # The solver is never differentiated here (the adjoint attaches the
        # derivatives), so it may batch its own way: see cache_sized_batches.
        start = jax.lax.stop_gradient((init_l, init_s))
        state, saturated = cache_sized_batches(run)(inner, *start, basis)
    parts = solver.postprocess(inner, options, state)
    residual = solver.residual(state)
    converged = solver.terminate(inner, options, state)[1]
    z, params = solver.fixed_point_problem(data, differentiable, state, parts)
    z = adjoint.apply(solver, differentiable, z, params)
    low_rank, sparse = z[0], z[1]
    if not options.offset:
        offset = None
    elif len(z) > 2:
        offset = z[2]
    else:
        offset = problem.optimal_offset(data, low_rank, sparse)
    if capped and unrolled:
        # Unrolled solves have no exact continuation: a full cap, or one whose rank
        # the certificate does not prove, is not converged.
        converged = jnp.logical_and(converged, state.rank < options.rank_cap)
        converged = jnp.logical_and(
            converged, _capped_solve_certified(solver, inner, options, state)
        )
    nuclear = None
    if capped:
        # The last capped factorisation left L's rows in the span of its basis: the
        # nuclear norm needs a p x rank_cap SVD, not a full one (unless the exact
        # continuation ran, which kept the old basis).
        nuclear = svt_capped.nuclear_norm_in_row_space(
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


#: A converged rank-capped solve is accepted when its capped SVT at the solution is
#: certified exact to within this many ``tol ||X||_F`` (:func:`svt_capped.capped_svt_certified`).
CAPPED_ERROR_FACTOR = 10.0


def _capped_solve_certified(
    solver: AbstractDecompositionSolver, data: problem.Data, options: problem.Options, state
) -> Array:
    """Whether a rank-capped solve's last SVT is proved close to the exact one.

    At a minimiser ``L = SVT_tau(Z)`` (``solver.svt_argument``). The certificate
    (:func:`svt_capped.capped_svt_certified`) proves that no singular value of ``Z``
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
    return svt_capped.capped_svt_certified(
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
