"""CLAIR on LoRA factors: exact factored server math and statistics for ``n r < min(p, q)``.

:func:`clair_factored` runs :func:`clair_jax.clair` on the small exact
coordinates of the updates ``X_i = B_i A_i`` (:mod:`clair_jax._src.solvers.factored`:
``C_i = (U^T B_i)(A_i V_i)``, ``k x m`` with ``k = min(p, nr)``, ``m = min(q, r)``)
and lifts the results back in factored form. No ``p x q`` product is formed.

**What is exactly the dense CLAIR.** Every step of :func:`clair_jax.clair`
other than its noise statistics is invariant under the lift
``Y_i ↦ U Y_i V_i^T`` (orthonormal ``U``, block-diagonal orthonormal
``blockdiag(V_i)``): the decomposition (see :mod:`clair_jax._src.solvers.factored`), the
singular values that set the rank (``s_j > λ_*``), the shared basis
(``Û = U Û_c``: left singular vectors of ``U Z blockdiag(V_i)^T`` are ``U``
times those of ``Z``), the scores ``d_i = ||(I - Û Û^T) X_i||_F =
||(I - Û_c Û_c^T) C_i||_F``, the robust threshold on them, the refit on the
collaborative clients, and the refinement ``X̃_i = X̄_Ĉ + P_Û (X_i - X̄_Ĉ)``.
With the same ``λ_*``, ``λ_S`` and ``σ̂`` (give ``lam_nuc``, ``lam_block`` and
``noise_scale``), flags, scores, rank and refined updates equal the dense
path's (``tests/test_factored.py`` compares them in float64).

**The statistics: Marchenko–Pastur on the coordinates' dimensions.** Dense
CLAIR estimates the noise level from the median singular value of the
``p x nq`` stacked matrix, matched to the median of the Marchenko–Pastur law of
a ``p x nq`` noise matrix (Gavish & Donoho 2014), and sets
``λ_* = 2 σ̂ (sqrt(p) + sqrt(nq))``, ``λ_S = 2 σ̂ sqrt(pq)``. For exact products
of LoRA factors with ``n r < min(p, q)`` the stacked matrix has rank at most
``n r``: more than half of its ``min(p, nq)`` singular values are exactly zero,
the median is zero, ``σ̂`` collapses to the noise floor and with it both λ's:
every client's whole update is absorbed in the low-rank part and none is
flagged. The estimation error of a LoRA update does not live in ``R^{p x q}``;
it lives where the update does, in the span of the factors. So the rule is
applied to the data in the smallest spaces that hold them: the coordinates ``C``
(``k x n m``). If the
clients' errors are white within those spaces, their coordinates are i.i.d.
with the same ``σ`` (an orthonormal change of basis keeps a white Gaussian
matrix white), so the Gavish–Donoho median rule, the λ's
``λ_* = 2 σ̂ (sqrt(k) + sqrt(n m))`` (twice the spectral norm of a ``k x nm``
noise matrix) and ``λ_S = 2 σ̂ sqrt(k m)`` (twice a noise block's Frobenius
norm), the rank rule ``s_j > λ_*`` and the threshold's floor ``σ̂ / sqrt(2)``
are today's rules with ``(p, q)`` replaced by the effective dimensions
``(k, m)``. Both regimes are covered by one rule:

* full-rank noisy estimates (``r >= q``, ``n r >= p``): ``k = p``, ``m = q``,
  the coordinates are the data rotated, and the statistics are exactly
  today's;
* exact products with ``n r < min(p, q)``: the coordinate matrix is
  ``nr x nr``, generically of full rank (noisy ``B``'s span ``nr``
  dimensions), and its median singular value sits in the noise bulk again.

Where the factors themselves are exactly rank deficient (clients sharing one
``B`` without noise) the surplus basis directions carry zero coordinates and
``σ̂`` falls to the noise floor, as it should for noiseless shared structure.
With ``offset=True`` the coordinates use one common right basis of all the
``A``'s (``m = min(q, nr)``), each block has rank ``<= r`` within ``m``
columns, and the median is again biased low when ``r < m/2``: prefer
``offset=False`` (round updates) at LLM scale.

References:
  M. Gavish, D. L. Donoho, "The optimal hard threshold for singular values is
  4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 2014, arXiv:1305.5870.
  CLAIR, arXiv:2605.21217 (abstract only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from clair_jax._src import validation
from clair_jax._src.clair.base import ClairResult
from clair_jax._src.clair.consensus import CONSENSUS_CHOICES, inside_detection, on_narrowest
from clair_jax._src.clair.pipeline import clair
from clair_jax._src.lora.types import LoRAFactors
from clair_jax._src.solvers import factored as fd

_HIGHEST = jax.lax.Precision.HIGHEST

#: Smallest side of the coordinate matrix from which the rank-capped SVD backend is
#: given a cap of ``2 r + 16`` (instead of ``"auto"``'s 16, which an exact rank-``r``
#: shared subspace with ``r >= 16`` binds, sending every solve to full SVDs).
CAPPED_FROM = 128


def _capped_width(r: int) -> int:
    """``2 r + 16``: columns of the shared basis the factored path works on while the rank
    fits (the rank-capped SVD's cap, and the detection's coordinates)."""
    return 2 * r + 16


class FactoredUpdates(NamedTuple):
    """Per-client matrices ``X_i = left @ coef[i] @ right`` (``p x q`` each, never formed).

    Attributes:
      left: ``(p, k)`` shared left factor (orthonormal ``U``).
      coef: ``(n, k, s)`` per-client coefficients.
      right: ``(s, q)`` shared right factor (the stacked ``A``'s, or ``V^T``).
    """

    left: Float[Array, "p k"]
    coef: Float[Array, "n k s"]
    right: Float[Array, "s q"]

    def dense(self) -> Array:
        """The dense ``(n, p, q)`` matrices (small problems only)."""
        return jnp.einsum("pk,nks,sq->npq", self.left, self.coef, self.right, precision=_HIGHEST)


class FactoredClairResult(NamedTuple):
    """Output of :func:`clair_factored` (the fields of :class:`clair_jax.ClairResult`, factored).

    Attributes:
      basis: ``(p, w)`` the shared basis ``Û = U Û_c`` (zero columns after ``rank``).
      rank: int32 ``r̂``.
      collaborative: ``(n,)`` bool ``Ĉ``.
      refined: :class:`FactoredUpdates` of the refined ``X̃_i`` (rank ``<= k``).
      consensus: ``(k, s)`` coefficient of ``X̄_Ĉ = left @ consensus @ refined.right``.
      scores: ``(n,)`` ``d_i`` (``inf`` for screened clients).
      threshold: ``τ``.
      noise_scale: ``σ̂`` per coordinate entry (module docstring).
      lam_nuc: ``λ_*`` used.
      lam_block: ``λ_S`` used.
      block_norms: ``(n,)`` ``||Ŝ_i||_F``.
      majority_refit: bool, see :class:`clair_jax.ClairResult`.
      coordinates: the :class:`clair_jax.ClairResult` of the coordinates (its
        ``refined`` is meaningful only with ``offset=True``).
      left_basis: ``(p, k)`` orthonormal ``U``.
      left_coef: ``(n, k, r)`` ``U^T B_i`` (the column blocks of the stacked ``B``'s
        ``R`` factor).
      right_frame: ``(V_A, A V_A)``: orthonormal ``V_A`` (``q x min(q, nr)``) of the
        rows of all the ``A``'s and the ``(n, r, min(q, nr))`` coefficients
        ``A_i V_A``, when the run computed them (``offset=True``, or the robust
        consensus), else None.
    """

    basis: Float[Array, "p w"]
    rank: Int[Array, ""]
    collaborative: Bool[Array, " n"]
    refined: FactoredUpdates
    consensus: Float[Array, "k s"]
    scores: Float[Array, " n"]
    threshold: Float[Array, ""]
    noise_scale: Float[Array, ""]
    lam_nuc: Float[Array, ""]
    lam_block: Float[Array, ""]
    block_norms: Float[Array, " n"]
    majority_refit: Bool[Array, ""]
    coordinates: ClairResult
    left_basis: Float[Array, "p k"]
    left_coef: Float[Array, "n k r"]
    right_frame: tuple[Array, Array] | None


def clair_factored(
    factors: LoRAFactors,
    *,
    offset: bool = False,
    contaminated: str = "consensus",
    consensus: str = "rank",
    svd: str = "auto",
    rank_cap: int | None = None,
    **clair_kwargs,
) -> FactoredClairResult:
    """:func:`clair_jax.clair` of the updates ``X_i = B_i A_i`` from their factors.

    Runs CLAIR on the exact coordinates ``C_i = (U^T B_i)(A_i V_i)`` and lifts
    the basis and the refined updates back in factored form; see the module
    docstring for why every step but the statistics is exactly the dense one,
    and for the statistics (the Marchenko–Pastur rule on the coordinates'
    dimensions ``k x nm``, which keeps working when ``n r < min(p, q)``).
    Memory and time scale with ``(p + q) n r`` and the ``k x nm`` coordinate
    problem, never with ``p q``.

    The refined updates are returned as :class:`FactoredUpdates` in the frame of
    ``U`` and the stacked ``A``'s (``s = n r``; with ``offset=True`` of the common
    right basis ``V^T``): ``X̃_i = U [X̄_c + P_c (G_i - X̄_c)] A_stack`` with
    ``G_i`` client ``i``'s block ``U^T B_i`` in column block ``i``.

    Args:
      factors: ``LoRAFactors(B (n, p, r), A (n, r, q))``; shared column space
        (pass ``LoRAFactors(A^T, B^T)`` for a shared row space).
      offset: a common unknown offset (see :func:`clair_jax.clair`); uses a
        common right basis of all the ``A``'s.
      contaminated: ``"consensus"``, ``"refine"`` or ``"local"`` (as
        :func:`clair_jax.clair`).
      consensus: ``"robust"`` (default), ``"rank"`` or ``"mean"`` (as
        :func:`clair_jax.clair`). With ``offset=False`` the detection inside the
        subspace compares the clients' coordinates ``Û^T X_i`` in the common
        frame of the stacked ``A``'s (``r̂ x min(q, nr)`` each), where the
        clients' per-client right frames would not compare them.
      svd: SVD backend of the coordinate decomposition.
      rank_cap: rank cap of the ``"rank_capped"`` backend; by default ``2 r + 16``
        when the coordinate matrix's smaller side is at least 128 and ``svd="auto"``.
      **clair_kwargs: passed to :func:`clair_jax.clair` (``rank``, ``max_rank``,
        ``lam_nuc``, ``lam_block``, ``threshold``, ``noise_scale`` (per
        coordinate entry), ``refit``, ``benign_majority``, ``method``, ``tol``,
        ``max_iter``, ...).

    Returns:
      A :class:`FactoredClairResult`.

    Raises:
      ValueError/TypeError: bad factors, and whatever :func:`clair_jax.clair` raises.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from clair_jax._src.lora.types import LoRAFactors
      >>> from clair_jax._src.clair.factored import clair_factored
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> n, p, q, r = 10, 48, 48, 2  # n r = 20 < p
      >>> shared = jax.random.normal(k[0], (p, r))
      >>> B = shared[None] + 0.01 * jax.random.normal(k[1], (n, p, r))
      >>> B = B.at[:2].set(jax.random.normal(k[2], (2, p, r)))  # 2 unrelated clients
      >>> A = jax.random.normal(k[3], (n, r, q))
      >>> res = clair_factored(LoRAFactors(B, A), benign_majority=True)
      >>> (~res.collaborative).nonzero()[0].tolist(), int(res.rank)
      ([0, 1], 2)
    """
    if contaminated not in ("consensus", "refine", "local"):
        raise ValueError(
            f"contaminated must be one of ('consensus', 'refine', 'local'), got {contaminated!r}."
        )
    if "contaminated" in clair_kwargs:  # pragma: no cover - guarded by the signature
        raise TypeError("contaminated given twice.")
    validation.check_choice(consensus, "consensus", CONSENSUS_CHOICES)
    # Per-client right frames (offset=False) do not compare clients' coordinates inside
    # the subspace: the small problem runs the shared-direction rule alone, and the
    # detection inside the subspace runs below in the common frame of the stacked A's,
    # whose coefficients A_i V_A also give the per-client R factors (smaller QRs).
    inner = "rank" if consensus == "robust" and not offset else consensus
    b_w, a_w = fd.working_factors(factors)
    right_frame = fd.common_right_basis(a_w) if inner != consensus else None
    fc = fd.factored_coordinates(
        LoRAFactors(b_w, a_w), common_right=bool(offset), right_frame=right_frame, checked=True
    )
    n, k, m = fc.coords.shape
    r = fc.left_coef.shape[2]
    if svd == "auto" and rank_cap is None and min(k, n * m) >= CAPPED_FROM:
        rank_cap = min(k, n * m, _capped_width(r))
    small = clair(
        fc.coords,
        offset=offset,
        contaminated="refine",
        svd=svd,
        rank_cap=rank_cap,
        consensus=inner,
        **clair_kwargs,
    )
    if offset:
        right_frame = (fc.right, fc.right_coef)  # the coordinates' common right basis
    if inner != consensus:
        width = max(rank_cap or 0, _capped_width(r))
        small = _detect_inside(small, fc.left_coef, right_frame, (r, width))
    basis_c = small.basis  # (k, w), zero columns after the rank
    basis = jnp.matmul(fc.left, basis_c, precision=_HIGHEST)
    if offset:
        # Common right basis V: the coordinates' own refinement is the refinement.
        coef, consensus = small.refined, small.consensus
        if contaminated != "refine":
            keep = small.collaborative[:, None, None]
            other = consensus[None] if contaminated == "consensus" else fc.coords
            coef = jnp.where(keep, coef, other)
        right = fc.right.T
    else:
        consensus, coef = _refine(fc.left_coef, basis_c, small.collaborative)
        if contaminated != "refine":
            keep = small.collaborative[:, None, None]
            other = consensus[None] if contaminated == "consensus" else _own_blocks(fc.left_coef)
            coef = jnp.where(keep, coef, other)
        b_a = jnp.asarray(factors[1])
        right = b_a.reshape(n * r, b_a.shape[2]).astype(coef.dtype)  # stacked A's
    return FactoredClairResult(
        basis=basis,
        rank=small.rank,
        collaborative=small.collaborative,
        refined=FactoredUpdates(fc.left, coef, right),
        consensus=consensus,
        scores=small.scores,
        threshold=small.threshold,
        noise_scale=small.noise_scale,
        lam_nuc=small.lam_nuc,
        lam_block=small.lam_block,
        block_norms=small.block_norms,
        majority_refit=small.majority_refit,
        coordinates=small,
        left_basis=fc.left,
        left_coef=fc.left_coef,
        right_frame=right_frame,
    )


def _detect_inside(small: ClairResult, beta: Array, right_frame, widths) -> ClairResult:
    """``small`` with CLAIR's detection inside the subspace run in a common right frame.

    Client ``i``'s coordinates ``Û^T X_i V_A = Û_c^T (U^T B_i)(A_i V_A)``, ``V_A`` an
    orthonormal basis of the rows of all the ``A``'s (``X_i`` restricted to it
    loses nothing; ``right_frame = (V_A, A V_A)``), are scored by
    :func:`~clair_jax._src.clair.consensus.inside_detection`.
    Columns of ``Û_c`` after the rank are zero and so are the coordinates' rows
    after it: only the first ``w`` rows are formed, ``w`` the smallest of ``widths``
    (static ints, or one int) that holds the rank (all of them when none does,
    :func:`~clair_jax._src.clair.consensus.on_narrowest`), the same scores at a
    fraction of the cost.
    """
    _, alpha = right_frame  # A_i V_A: (n, r, m)
    n = alpha.shape[0]
    members = small.collaborative & jnp.isfinite(small.scores)

    def detect(w: int):
        basis = small.basis[:, :w]
        coords = jnp.einsum("kw,nkr,nrm->nwm", basis, beta, alpha, precision=_HIGHEST)
        active = jnp.linalg.norm(coords.reshape(n, -1), axis=1) > 0
        return inside_detection(coords, members & active)

    widths = np.atleast_1d(widths)
    inliers, scores, tau = on_narrowest(small.rank, widths, small.basis.shape[1], detect)
    return small._replace(
        collaborative=small.collaborative & inliers,
        inside_scores=jnp.where(jnp.isfinite(small.scores), scores, jnp.inf),
        inside_threshold=tau,
    )


def _own_blocks(beta: Array) -> Array:
    """``(n, k, nr)``: client ``i``'s ``U^T B_i`` in column block ``i``, zeros elsewhere."""
    n, k, r = beta.shape
    eye = jnp.eye(n, dtype=beta.dtype)
    return jnp.einsum("ij,ikr->ikjr", eye, beta).reshape(n, k, n * r)


def _refine(beta: Array, basis_c: Array, collaborative: Array) -> tuple[Array, Array]:
    """CLAIR's refinement on coefficients: ``(X̄_c, X̄_c + P_c (G_i - X̄_c))``.

    ``G_i`` (client ``i``'s ``U^T B_i`` in column block ``i``, :func:`_own_blocks`)
    is zero outside block ``i``, so ``X̄_c + P_c (G_i - X̄_c) = (I - P_c) X̄_c``
    plus ``P_c U^T B_i`` in block ``i``: one projection of the ``k x nr``
    consensus and one of the ``n`` ``k x r`` blocks, instead of ``n`` projections
    of ``k x nr`` matrices.
    """
    n, k, r = beta.shape
    weight = collaborative.astype(beta.dtype)
    count = jnp.sum(weight)
    weight = jnp.where(count > 0, weight / jnp.maximum(count, 1.0), jnp.full_like(weight, 1.0 / n))
    # Block j of the consensus is w_j U^T B_j.
    consensus = jnp.transpose(weight[:, None, None] * beta, (1, 0, 2)).reshape(k, n * r)

    def project(z):
        return jnp.matmul(basis_c, jnp.matmul(basis_c.T, z, precision=_HIGHEST), precision=_HIGHEST)

    outside = consensus - project(consensus)
    inside_own = project(jnp.transpose(beta, (1, 0, 2)).reshape(k, n * r))  # P_c U^T B_i
    inside_own = jnp.transpose(inside_own.reshape(k, n, r), (1, 0, 2))
    return consensus, outside[None] + _own_blocks(inside_own)
