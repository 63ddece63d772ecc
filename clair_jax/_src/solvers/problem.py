"""The low-rank + block-sparse problem: data, static options, objective, fixed-point map.

Penalised form (a block version of Outlier Pursuit, Xu, Caramanis & Sanghavi
2012, arXiv:1010.4237):

.. math::

    \\min_{L, S, c}\\; \\tfrac12 \\sum_i \\|X_i - c - L_i - S_i\\|_F^2
      + \\lambda_* \\|L\\|_* + \\lambda_S \\sum_i w_i \\|S_i\\|_F

and the constrained (noiseless) form
:math:`\\min \\lambda_*\\|L\\|_* + \\lambda_S \\sum_i w_i\\|S_i\\|_F` s.t.
:math:`X_i = c + L_i + S_i`. The offset ``c`` is unpenalised (``offset=True``) or
zero. Minimising the penalised objective over ``c`` in closed form gives
``c = mean_i(X_i - L_i - S_i)``, which turns the quadratic into
``1/2 ||P(X - L - S)||^2`` with ``P`` the centring over clients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src.linalg import prox, sparsity
from clair_jax._src.linalg import svt as svt_lib

# Step size of the proximal-gradient map: the gradient of
# (L, S) -> 1/2 ||P(X - L - S)||^2 is Lipschitz with constant ||[P, P]||^2 = 2.
STEP = 0.5


class Options(NamedTuple):
    """Static (hashable) configuration of the problem and its stopping rule.

    The method is the solver object (:class:`base.AbstractDecompositionSolver`) and
    the differentiation mode the adjoint object (:mod:`adjoint`), not fields here.
    """

    constrained: bool
    offset: bool
    tol: float
    max_iter: int
    backend: str
    rank_cap: int | None
    power_iters: int
    sparsity: str = "block"


class Data(NamedTuple):
    """Traced problem data."""

    updates: Float[Array, "n p q"]
    lam_nuc: Float[Array, ""]
    lam_block: Float[Array, ""]
    weights: Float[Array, " n"]


#: Consecutive iterations at a full rank cap after which a capped solve stops (and
#: :func:`clair_jax.decompose` continues with the exact factorisation).
SATURATION_PATIENCE = 10


def saturation_stop(options: Options) -> dict:
    """``run_iterations`` keywords that end a rank-capped solve whose cap binds.

    When the thresholded rank stays at ``rank_cap`` for ``SATURATION_PATIENCE``
    iterations, the capped fixed point need not be the minimiser, and
    :func:`clair_jax.decompose` continues exactly from where the capped phase
    stopped: iterating on under the cap would only approach the wrong point.
    Only for ``"rank_capped"`` solves; the unrolled loop ignores these keywords
    (it has no exact continuation).
    """
    if options.backend != "rank_capped":
        return {}
    return {
        "give_up": lambda state: state.rank >= options.rank_cap,
        "patience": SATURATION_PATIENCE,
    }


def data_scale(data: Data) -> Array:
    """The scale residuals are measured against: ``||X||_F`` (1 for zero data).

    With an offset, the solvers get the centred blocks ``X_i - X̄``
    (``decomposition.solve_decomposition``): a large common part (a base weight
    ``W_0``), which the unpenalised offset absorbs, neither loosens the tolerance
    nor floors the residual.
    """
    norm = jnp.sqrt(jnp.sum(data.updates**2))
    return jnp.where(norm > 0, norm, 1.0)


def residual_blocks(data: Data, low_rank, sparse, offset: bool) -> Array:
    """``X - c - L - S`` with the optimal offset ``c`` eliminated when ``offset``."""
    r = data.updates - low_rank - sparse
    return prox.center_clients(r) if offset else r


def svt_blocks(z, tau, options: Options, basis):
    """Singular value thresholding of ``(n, p, q)`` blocks as one ``p x nq`` matrix."""
    n = z.shape[0]
    out, rank, basis = svt_lib.svt(
        prox.blocks_to_matrix(z),
        tau,
        backend=options.backend,
        basis=basis,
        power_iters=options.power_iters,
    )
    return prox.matrix_to_blocks(out, n), rank, basis


def prox_grad_map(data: Data, low_rank, sparse, options: Options, basis=None):
    """One proximal-gradient step of the penalised problem, step ``STEP``.

    Its fixed points are exactly the minimisers (in ``(L, S)``; the offset is
    eliminated), which is what implicit differentiation uses.

    Returns:
      ``(low_rank, sparse, rank, basis)``.
    """
    r = residual_blocks(data, low_rank, sparse, options.offset)
    new_l, rank, basis = svt_blocks(low_rank + STEP * r, STEP * data.lam_nuc, options, basis)
    new_s = sparsity.prox(sparse + STEP * r, STEP * data.lam_block * data.weights, options.sparsity)
    return new_l, new_s, rank, basis


def penalised_svt_argument(data: Data, low_rank, sparse, options: Options):
    """``(Z, tau)`` with ``L = SVT_tau(Z)`` at a minimiser of the penalised problem.

    Stationarity in ``L`` at step 1: ``L = SVT_{λ_*}(L + P(X - L - S))``. Used to
    certify a rank-capped solve (:func:`svt_capped.capped_svt_certified`).
    """
    return low_rank + residual_blocks(data, low_rank, sparse, options.offset), data.lam_nuc


def optimal_offset(data: Data, low_rank, sparse) -> Array:
    """``argmin_c 1/2 sum_i ||X_i - c - L_i - S_i||^2 = mean_i(X_i - L_i - S_i)``."""
    return jnp.mean(data.updates - low_rank - sparse, axis=0)


def objective(data: Data, low_rank, sparse, offset, options: Options, nuclear=None) -> Array:
    """Objective value (the penalty terms only for the constrained form).

    ``nuclear``: ``||L||_*`` when the caller has it (default: a full SVD of ``L``).
    """
    if nuclear is None:
        nuclear = prox.nuclear_norm(low_rank)
    penalty = data.lam_nuc * nuclear + data.lam_block * sparsity.norm(
        sparse, data.weights, options.sparsity
    )
    if options.constrained:
        return penalty
    r = data.updates - low_rank - sparse
    if offset is not None:
        r = r - offset[None]
    return 0.5 * jnp.sum(r * r) + penalty
