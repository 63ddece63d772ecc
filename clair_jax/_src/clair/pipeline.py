"""CLAIR: shared-subspace recovery, contaminated-client detection and refinement.

Collaborative Low-rank Alignment and Identifiable Recovery (CLAIR) works from
preliminary local estimates ``X_1 .. X_n`` (``p x q`` each: LoRA updates,
regression coefficient matrices, fine-tuned weights). This module implements a
reconstruction of the procedure from the paper's abstract, built on the block
Outlier Pursuit decomposition of :func:`clair_jax.decompose`; every default is a
data-driven rule.

The steps (``M = [X_1 .. X_n]``, ``p x nq``; ``c`` the common offset when
``offset=True``, zero otherwise):

0. **Screen.** A client whose root-mean-square entry exceeds ``SCREEN_RATIO``
   (``10^3``) times the typical client's (the median over clients with a
   non-zero update) is flagged outright (score ``inf``) and fitted as a zero
   block of weight zero: it is off any shared structure and would swamp the
   floating-point precision of the fit.
1. **Noise level.** ``σ̂``, the per-entry standard deviation of the estimation
   error, starts from the median singular value of ``M`` (centred over clients
   with an offset) matched to the median of the Marchenko–Pastur law. Each
   pass decomposes with the λ's of ``σ̂`` (warm-started) and re-estimates
   ``σ̂`` from the off-subspace residuals ``(I - Û Û^T)(X_i - c)`` of the
   clients scoring below both ``τ`` and the median score. At most
   ``noise_passes`` passes precede the final decomposition; they stop once
   ``σ̂`` moves by less than ``NOISE_RTOL``. ``σ̂`` is kept above
   ``NOISE_FLOOR`` times the typical client's root-mean-square entry.
2. **Decomposition.** Penalised block Outlier Pursuit with
   ``λ_* = 2 σ̂ (sqrt(p) + sqrt(nq))`` (twice the spectral norm of a
   ``p x nq`` noise matrix) and ``λ_S = 2 σ̂ sqrt(pq)`` (twice the Frobenius
   norm of a noise block).
3. **Rank and subspace.** ``r̂`` is the number of singular values of
   ``Z = M - c - Ŝ`` above ``λ_*`` and ``Û`` their left singular vectors. With
   ``refit=True`` ``Û`` is recomputed without shrinkage from the collaborative
   clients (step 4): the top ``r̂`` left singular vectors of
   ``[X_j - c̄]_{j ∈ Ĉ}``, the least-squares refit on the detected support.
4. **Detection.** Client ``i`` scores ``d_i = ||(I - Û Û^T)(X_i - c)||_F``.
   The collaborative set is ``Ĉ = {i : d_i <= τ}`` with
   ``τ = m + 3.5 max(1.4826 MAD, σ̂ / sqrt(2), 0.1 m)``, ``m`` and ``MAD`` the
   median and median absolute deviation of the scores of a benign set that
   starts as the lower half of the scores and is re-estimated as
   ``{d_i <= τ}``. With ``refit=True`` detection runs again on the refitted
   subspace, with ``σ̂`` re-estimated from the collaborative residuals.
   With ``consensus="robust"`` (the CLAIR aggregators' default) two rules of
   ``clair_jax._src.clair.consensus`` make the result resist attackers inside
   the shared subspace. In step 3 the directions a coordinated minority
   carries (more than one client's worth, at most half of the clients; each
   client votes with the projector onto its own significant directions) are
   removed from the rank rule's span, so a coordinated group in its own
   subspace stays outside ``Û``. After detection (step 4b),
   the collaborative clients' coordinates ``C_i = Û^T (X_i - c)`` are scored by
   ``e_i = ||C_i - m||_F`` about their geometric median ``m``, and clients whose
   ``log e_i`` exceeds the median log score by 5 robust spreads are flagged too.
5. **Refinement.** ``X̃_i = P_Û X_i + (I - P_Û) X̄_Ĉ`` with
   ``X̄_Ĉ = mean_{j ∈ Ĉ} X_j``. Flagged clients receive the consensus
   ``X̄_Ĉ`` (``contaminated="consensus"``), the same refinement
   (``"refine"``), or their own update (``"local"``).
6. **Benign majority** (``benign_majority=True``). When fewer than half of the
   clients come out collaborative, CLAIR refits on the flagged majority (the
   unshrunk fit of step 3 with the rank rule of steps 1-3 on that majority)
   and detects again; the result is kept when it declares a majority
   collaborative (``majority_refit``). A coordinated group of identical
   updates can otherwise become the shared subspace when the benign updates
   are diverse; the price is that a low-rank benign minority among dense
   contamination is no longer recovered.

Under ``jax.jit`` a data-driven rank cannot change shapes: with ``rank=None``
``basis`` has ``max_rank`` columns, the first ``r̂`` the estimated basis and the
rest zero (``Û Û^T`` is still the projector). A given ``rank`` is static and
``basis`` has exactly ``rank`` columns.

References:
  CLAIR, arXiv:2605.21217.
  H. Xu, C. Caramanis, S. Sanghavi, "Robust PCA via Outlier Pursuit", IEEE
  Trans. Inf. Theory 58(5), 2012, arXiv:1010.4237.
  M. Gavish, D. L. Donoho, "The optimal hard threshold for singular values is
  4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 2014, arXiv:1305.5870.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from clair_jax._src import validation
from clair_jax._src.clair.base import ClairResult, Config
from clair_jax._src.clair.consensus import CONSENSUS_CHOICES
from clair_jax._src.clair.core import clair_core
from clair_jax._src.clair.detection import screen
from clair_jax._src.clair.noise import typical_size
from clair_jax._src.clair.refinement import refine
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent
from clair_jax._src.solvers.decomposition import rescaled

CONTAMINATED_CHOICES = ("consensus", "refine", "local")


def clair(
    updates: Float[ArrayLike, "n p q"],
    *,
    rank: int | None = None,
    max_rank: int | None = None,
    lam_nuc: float | Float[ArrayLike, ""] | None = None,
    lam_block: float | Float[ArrayLike, ""] | None = None,
    threshold: float | Float[ArrayLike, ""] | None = None,
    noise_scale: float | Float[ArrayLike, ""] | None = None,
    offset: bool = False,
    contaminated: str = "consensus",
    refit: bool = True,
    noise_passes: int = 4,
    benign_majority: bool = False,
    consensus: str = "rank",
    exclude=None,
    method: str = "admm",
    tol: float = 1e-6,
    max_iter: int = 2000,
    svd: str = "auto",
    rank_cap: int | None = None,
) -> ClairResult:
    """Shared subspace, collaborative clients and refined estimates from local updates.

    The procedure is in the docstring of ``clair_jax._src.clair.pipeline``; in short:
    estimate the noise level ``σ̂`` robustly, decompose ``[X_1 .. X_n] = c + L + S``
    with ``λ_* = 2σ̂(sqrt(p) + sqrt(nq))`` and ``λ_S = 2σ̂ sqrt(pq)``, take the
    shared basis ``Û`` from the low-rank part (rank: singular values above
    ``λ_*``), flag the clients whose off-subspace residual ``d_i`` exceeds a
    robust threshold ``τ``, refit ``Û`` on the collaborative set ``Ĉ`` and return

    .. math::

        \\tilde X_i = P_{\\hat U} X_i + (I - P_{\\hat U})
          \\frac{1}{|\\hat C|}\\sum_{j \\in \\hat C} X_j .

    Not differentiable (detection and the rank estimate are discrete, and the
    SVDs carry a ``custom_vmap`` rule without reverse mode); differentiate
    :func:`clair_jax.decompose` instead.

    Args:
      updates: ``(n, p, q)`` preliminary estimates of ``n >= 2`` clients; the
        shared structure is a column space in ``R^p`` (pass
        ``updates.transpose(0, 2, 1)`` for a row space). Batch modules with
        ``jax.vmap``. Half precision is processed, and returned, in float32.
        Detection's robust statistics need several clients (a dozen or more).
      rank: static rank ``r`` of the shared subspace; ``None`` estimates it.
      max_rank: columns of ``basis`` when ``rank=None`` (static; default
        ``min(p, nq)``); the estimate is clipped to it.
      lam_nuc: ``λ_*`` (default: the rule above).
      lam_block: ``λ_S`` (default: the rule above).
      threshold: ``τ >= 0`` on the scores ``d_i`` (default: the robust rule).
      noise_scale: the per-entry noise level ``σ``, if known (skips its
        estimation); kept above the noise floor like the estimate.
      offset: the updates share an unknown common offset ``c`` (e.g. the base
        weight ``W_0`` when the server sees fine-tuned weights).
      contaminated: what flagged clients receive: ``"consensus"``, ``"refine"``
        or ``"local"`` (step 5).
      refit: recompute the basis (and offset) on the collaborative set.
      noise_passes: at most this many decompositions refine ``σ̂`` before the
        final one.
      benign_majority: assume fewer than half of the clients are contaminated
        (step 6; ``majority_refit`` in the result says when it applied).
      exclude: ``(n,)`` bool, clients to leave out as step 0 leaves out an
        outsized one (e.g. those an aggregator's screening excluded): flagged,
        and kept out of every statistic. None: nobody.
      consensus: ``"robust"`` (both rules of the robust consensus, steps 3 and
        4b), ``"rank"`` (the shared-direction rule of step 3 alone) or
        ``"mean"`` (neither: the plain rank rule and detection off the subspace
        only). ``"rank"`` by default: step 4b assumes the benign clients'
        coordinates inside the subspace cluster, which a heterogeneous federation
        of few clients need not satisfy; the CLAIR aggregators, whose global
        adapter is a location estimate, use ``"robust"``.
      method: ``"admm"`` (default: FISTA can stall in float32 on exactly
        low-rank updates) or ``"fista"``, see :func:`clair_jax.decompose`.
      tol: relative tolerance of the decomposition.
      max_iter: iteration cap of each decomposition.
      svd: SVD backend of the decomposition.
      rank_cap: rank cap of the ``"rank_capped"`` backend.

    Returns:
      A :class:`ClairResult`.

    Raises:
      ValueError: bad shapes, fewer than 2 clients, NaN/inf, ``rank`` or
        ``max_rank`` outside ``[1, min(p, nq)]``, negative λ's, threshold or
        noise scale, unknown ``contaminated``/``consensus``/``method``/``svd``.
      TypeError: non-numeric arguments, traced static configuration.

    Examples:
      >>> import jax
      >>> import clair_jax as cj
      >>> fed = cj.simulate.shared_subspace_updates(
      ...     jax.random.key(0), n=12, p=10, q=3, rank=2, fraction=0.25, noise=0.01)
      >>> res = cj.clair(fed.updates)
      >>> int(res.rank), res.basis.shape
      (2, (10, 10))
      >>> bool((res.collaborative == ~fed.contaminated).all())
      True
    """
    x = validation.as_factorisable(
        updates,
        "updates",
        3,
        "(n, p, q) (clients, rows, cols)",
        "batch several modules with jax.vmap",
    )
    n, p, q = x.shape
    if n < 2 or p < 1 or q < 1:
        raise ValueError(
            f"updates must hold n >= 2 non-empty client blocks, got shape {(n, p, q)}."
        )
    x = validation.check_finite(x, "updates")
    full = min(p, n * q)
    if rank is not None:
        rank = _check_rank(rank, "rank", full, (n, p, q))
        if max_rank is not None:
            raise ValueError(
                "give rank (a fixed rank) or max_rank (a cap on the estimate), not both."
            )
    max_rank = full if max_rank is None else _check_rank(max_rank, "max_rank", full, (n, p, q))
    validation.check_choice(contaminated, "contaminated", CONTAMINATED_CHOICES)
    validation.check_choice(consensus, "consensus", CONSENSUS_CHOICES)
    for flag, name in ((benign_majority, "benign_majority"), (offset, "offset"), (refit, "refit")):
        validation.check_bool(flag, name)
    if isinstance(noise_passes, bool) or not isinstance(noise_passes, int):
        raise TypeError(f"noise_passes must be an int, got {type(noise_passes).__name__}.")
    if noise_passes < 0:
        raise ValueError(f"noise_passes must be an int >= 0, got {noise_passes!r}.")

    scalars = {}
    for name, value in (
        ("lam_nuc", lam_nuc),
        ("lam_block", lam_block),
        ("threshold", threshold),
        ("noise_scale", noise_scale),
    ):
        if value is None:
            scalars[name] = jnp.zeros((), x.dtype)
            continue
        arr = validation.as_float_array(value, name, x.dtype)
        validation.check_scalar(arr, name)
        scalars[name] = validation.check_nonnegative(arr, name)
    cfg = Config(
        rank=rank,
        max_rank=max_rank,
        offset=bool(offset),
        refit=bool(refit),
        noise_passes=noise_passes,
        given_noise=noise_scale is not None,
        benign_majority=bool(benign_majority),
        consensus=consensus,
        solver=(
            ("method", method),
            ("tol", tol),
            ("max_iter", max_iter),
            ("svd", svd),
            ("rank_cap", rank_cap),
        ),
    )
    # Validate the solver options now (clear errors before tracing).
    validation.check_choice(method, "method", ("fista", "admm"))
    validation.check_positive_float(tol, "tol")
    validation.check_positive_int(max_iter, "max_iter")
    given = jnp.array([lam_nuc is not None, lam_block is not None, threshold is not None])
    # Step 0 on the updates as given (the sizes are computed without overflow): a
    # client 1e30 times the others is screened out before anything is scaled.
    screened, typical = screen(x, cfg.offset)
    if exclude is not None:
        exclude = jnp.asarray(exclude)
        if exclude.shape != (n,) or exclude.dtype != jnp.bool_:
            raise ValueError(
                f"exclude must be a bool array of shape (n,) = ({n},), got "
                f"{exclude.dtype} {tuple(exclude.shape)}."
            )
        screened = screened | exclude
    # Every step is equivariant to the scale of the updates (σ̂, the λ's, τ and the
    # estimates scale with them): run on X 2^-e and scale back, 2^e the power of two
    # (scaling.working_exponent) of the typical (median non-zero, unscreened)
    # client's largest entry, so that float32 squares of the typical client neither
    # underflow nor overflow.
    peaks = jnp.max(jnp.abs(x), axis=(1, 2))
    exponent = working_exponent(typical_size(jnp.where(screened, 0.0, peaks)))
    kept = jnp.where(screened[:, None, None], 0.0, x)
    res = clair_core(
        cfg,
        times_power_of_two(kept, -exponent),
        *(
            times_power_of_two(scalars[k], -exponent)
            for k in ("lam_nuc", "lam_block", "threshold", "noise_scale")
        ),
        given,
        screened,
        times_power_of_two(typical, -exponent),
    )
    res = _scaled(res, exponent)
    # Step 5 on the updates as given (screened clients included).
    consensus, refined = refine(x, res.basis, res.collaborative)
    res = res._replace(consensus=consensus, refined=refined)
    if contaminated == "refine":
        return res
    keep = res.collaborative[:, None, None]
    other = res.consensus[None] if contaminated == "consensus" else x
    return res._replace(refined=jnp.where(keep, res.refined, other))


def _scaled(res: ClairResult, exponent: Array) -> ClairResult:
    """``res`` of ``X 2^-e`` turned into that of ``X`` (sizes times ``2^e``; before step 5)."""
    return res._replace(
        **{
            field: times_power_of_two(getattr(res, field), exponent)
            for field in (
                "scores",
                "threshold",
                "noise_scale",
                "lam_nuc",
                "lam_block",
                "block_norms",
                "inside_scores",
                "inside_threshold",
            )
        },
        decomposition=rescaled(res.decomposition, exponent),
    )


def _check_rank(value, name: str, full: int, shape) -> int:
    if validation.is_traced(value):
        raise TypeError(f"{name} must be a static Python int, not a traced array.")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if not 1 <= int(value) <= full:
        raise ValueError(
            f"{name} must be in [1, min(p, n q)] = [1, {full}] for updates of shape {shape}, "
            f"got {int(value)}."
        )
    return int(value)
