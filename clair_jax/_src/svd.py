"""Singular value thresholding with interchangeable factorisation backends.

The proximal map of ``tau * ||.||_*`` (the nuclear norm) is singular value
thresholding (Cai, Candès & Shen 2010, arXiv:0810.3286):

.. math::

    \\operatorname{SVT}_\\tau(Z) = U \\max(\\Sigma - \\tau, 0) V^\\top,
    \\qquad Z = U \\Sigma V^\\top.

One factorisation per solver iteration is the cost that matters, so three
backends compute it:

* ``"full"``: the thin SVD of ``Z`` (:func:`thin_svd`), the most accurate.
* ``"gram"``: the eigen-decomposition of the smaller Gram matrix (``Z Z^T`` when
  ``Z`` is wide, ``Z^T Z`` when it is tall). Cheaper when the aspect ratio is
  large, but it squares the condition number: singular values below about
  ``sqrt(eps) * sigma_max`` are not resolved (harmless here, because they are
  thresholded to zero whenever ``tau`` exceeds that level). Its derivative is
  the closed form of the full route (from a thin SVD), not autodiff through
  ``eigh``, which is NaN at repeated eigenvalues.
* ``"rank_capped"``: a block power (subspace) iteration with ``rank_cap``
  columns, warm-started from the previous solver iteration's right singular
  vectors (Halko, Martinsson & Tropp 2011, arXiv:0909.4061). Cost
  ``O(p * nq * rank_cap)`` instead of ``O(p * nq * min(p, nq))``. Exact at a
  fixed point as long as the thresholded rank stays below ``rank_cap``.

``"auto"`` picks ``"rank_capped"`` when the caller gives ``rank_cap``. Otherwise
:func:`auto_rank_cap` gives matrices whose smaller side is at least
``AUTO_CAP_MIN_SIZE`` (128) a cap of ``AUTO_RANK_CAP`` (16) off TPU: the solvers
continue with the exact factorisation whenever that cap binds or the rank
found is not certified (:func:`capped_svt_certified`; see :func:`clair_jax.decompose`),
so the cap costs speed, not accuracy (up to the tolerance), and the
low-rank parts this library looks for (a shared LoRA subspace) are far below
it. Smaller matrices get ``"gram"`` on TPU (where the SVD is slow) and for
float64 matrices whose aspect ratio is at least 2, ``"full"`` in every other
case. float32 stays on ``"full"``
because the Gram route resolves a singular value ``sigma`` only to about
``eps * sigma_max**2 / sigma``, which stalls the solvers above a relative
tolerance of about 1e-6 when the threshold is small compared with ``sigma_max``.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src import batching, validation

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

    ``AUTO_RANK_CAP`` when ``backend == "auto"``, the smaller side is at least
    ``AUTO_CAP_MIN_SIZE`` and the default JAX backend is not a TPU; None
    otherwise.

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

    Raises:
      ValueError: as :func:`select_backend`.
    """
    if rank_cap is None and not unrolled:
        rank_cap = auto_rank_cap(shape, backend)
    used = select_backend(shape, backend, rank_cap, dtype)  # validates rank_cap
    return used, None if rank_cap is None else int(rank_cap)


#: Aspect ratio (long side / short side) from which :func:`thin_svd` first
#: reduces the matrix to its short side by a QR factorisation.
QR_FIRST_ASPECT = 2


def thin_svd(z: Float[Array, "p m"], compute_uv: bool = True):
    """Thin SVD ``z = U diag(s) V^T`` (``jnp.linalg.svd(z, full_matrices=False)``).

    For a matrix at least ``QR_FIRST_ASPECT`` times wider than tall (or taller
    than wide) it first factorises ``z^T = Q R`` (``z = Q R``) and takes the
    SVD of the small square ``R^T`` (``R``): ``z = U_R Σ (Q W_R)^T``. Exact
    (unlike the Gram route it does not square the condition number), and on
    CPU about twice as fast for a ``64 x 1280`` float32 matrix (LAPACK's SVD of
    a wide matrix costs several times its QR). Not meant for autodiff (the QR's
    derivative is singular at rank-deficient inputs); the SVT has its own JVP.

    Under ``jax.vmap`` on CPU the matrices are factorised one at a time
    (:func:`clair_jax._src.batching.sequential_on_cpu`): jaxlib 0.10's batched QR
    and SVD kernels deadlocked XLA:CPU's thread pool when two ran concurrently
    (``jax.vmap(cj.clair)`` over 20 federations of 40 clients, ``64 x 640``
    blocks, hung at 0% CPU). Other backends batch as usual. Every factorisation
    of this module goes through such a wrapper.

    Returns:
      ``(U, s, V^T)``, or ``s`` alone when ``compute_uv`` is False; ``s``
      descending.
    """
    return _thin_svd_factors(z) if compute_uv else _thin_svd_values(z)


def _qr_first_svd(z: Array, compute_uv: bool):
    rows, cols = z.shape
    if cols >= QR_FIRST_ASPECT * rows:  # wide: z = R^T Q^T
        q, r = jnp.linalg.qr(z.T)
        if not compute_uv:
            return jnp.linalg.svd(r, compute_uv=False)
        u, s, wt = jnp.linalg.svd(r.T)
        return u, s, wt @ q.T
    if rows >= QR_FIRST_ASPECT * cols:  # tall: z = Q R
        q, r = jnp.linalg.qr(z)
        if not compute_uv:
            return jnp.linalg.svd(r, compute_uv=False)
        w, s, vt = jnp.linalg.svd(r)
        return q @ w, s, vt
    out = jnp.linalg.svd(z, full_matrices=False, compute_uv=compute_uv)
    return tuple(out) if compute_uv else out  # a plain tuple, not jnp's SVDResult


@batching.sequential_on_cpu
def _thin_svd_factors(z: Array):
    return _qr_first_svd(z, True)


@batching.sequential_on_cpu
def _thin_svd_values(z: Array):
    return _qr_first_svd(z, False)


@batching.sequential_on_cpu
def orthonormal_factor(z: Array) -> Array:
    """``Q`` of the thin QR factorisation ``z = Q R`` (one matrix at a time under vmap on CPU)."""
    return jnp.linalg.qr(z)[0]


@batching.sequential_on_cpu
def _symmetric_eigh(a: Array) -> tuple[Array, Array]:
    """``(eigenvalues ascending, eigenvectors)`` of the symmetric ``a``."""
    evals, evecs = jnp.linalg.eigh(a)
    return evals, evecs


def _shrink(s: Array, tau: Array) -> Array:
    return jnp.maximum(s - tau, 0.0)


def _svt_full(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    if z.shape[0] > z.shape[1]:
        out, s = _svt_wide(z.T, tau)
        return out.T, jnp.sum(s > tau)
    out, s = _svt_wide(z, tau)
    return out, jnp.sum(s > tau)


def _ratio(num, den, limit):
    """``num / den`` clipped to ``[0, 1]``, ``limit`` where ``den == 0``."""
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, limit, jnp.clip(num / safe, 0.0, 1.0))


@jax.custom_jvp
def _svt_wide(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), singular values of z)`` for ``p <= m``, with a closed-form JVP."""
    u, s, vt = thin_svd(z)
    return (u * _shrink(s, tau)[None, :]) @ vt, s


@_svt_wide.defjvp
def _svt_wide_jvp(primals, tangents):
    z, tau = primals
    (out, s), tangent = _svt_wide_tangent(z, tau, *tangents)
    return (out, s), tangent


def _svt_wide_tangent(z, tau, dz, dtau):
    r"""The differential of SVT (Candès, Sing-Long & Trzasko 2013, arXiv:1210.4139).

    With ``z = U diag(s) V^T`` (thin, ``p <= m``), ``f(s) = max(s - tau, 0)`` and
    ``A = U^T dz V``:

    .. math::

        d\,\mathrm{SVT} = U \big(R^- \circ \mathrm{sym}(A) + R^+ \circ
          \mathrm{skew}(A)\big) V^T + U \operatorname{diag}(f(s)/s) U^T dz
          (I - V V^T) - d\tau\, U \operatorname{diag}(1[s > \tau]) V^T

    with ``R^-_ij = (f_i - f_j)/(s_i - s_j)`` and ``R^+_ij = (f_i + f_j)/(s_i + s_j)``,
    divided differences of a monotone 1-Lipschitz ``f``, so in ``[0, 1]``; where
    the denominator vanishes (repeated or zero singular values, e.g. exactly
    low-rank or zero data) they take their limits ``f'(s_i)`` and ``1[tau == 0]``,
    with ``f'(s) = 1[s > tau]`` except that ``f`` is the identity on ``s >= 0``
    when ``tau == 0`` (``SVT_0(z) = z``): ``f' = 1`` there, also at ``s = 0``
    (an exactly zero repeated singular value, as LAPACK returns for some
    rank-deficient matrices). Autodiff through ``jnp.linalg.svd`` divides by
    ``s_i^2 - s_j^2`` instead and returns NaN there.
    """
    u, s, vt = thin_svd(z)
    f = _shrink(s, tau)
    active = (s > tau).astype(z.dtype)
    zero_limit = jnp.where(tau == 0, 1.0, 0.0).astype(z.dtype)
    slope = jnp.maximum(active, zero_limit)  # f'(s); f is the identity when tau == 0
    r_minus = _ratio(f[:, None] - f[None, :], s[:, None] - s[None, :], slope[:, None])
    r_plus = _ratio(f[:, None] + f[None, :], s[:, None] + s[None, :], zero_limit)
    left = u.T @ dz  # (p, m)
    a = left @ vt.T  # (p, p)
    inner = r_minus * 0.5 * (a + a.T) + r_plus * 0.5 * (a - a.T)
    scale = _ratio(f, s, zero_limit)
    complement = (u * scale[None, :]) @ (left - a @ vt)
    d_out = u @ inner @ vt + complement - dtau * (u * active[None, :]) @ vt
    return ((u * f[None, :]) @ vt, s), (d_out, jnp.diagonal(a))


def _svt_gram(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    if z.shape[0] > z.shape[1]:
        out, s = _svt_gram_wide(z.T, tau)
        return out.T, jnp.sum(s > tau)
    out, s = _svt_gram_wide(z, tau)
    return out, jnp.sum(s > tau)


@jax.custom_jvp
def _svt_gram_wide(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), singular values of z)`` for ``p <= m`` from ``eigh(z z^T)``.

    Differentiated with the closed form of :func:`_svt_wide_jvp` (from a thin
    SVD of ``z``): autodiff through ``eigh`` divides by eigenvalue gaps and
    returns NaN for repeated ones (exactly low-rank or zero data).
    """
    gram = z @ z.T
    gram = 0.5 * (gram + gram.T)
    evals, evecs = _symmetric_eigh(gram)
    s = jnp.sqrt(jnp.maximum(evals, 0.0))
    keep = s > tau
    # Safe division: the ratio is only used where s > tau >= 0.
    s_safe = jnp.where(keep, s, 1.0)
    ratio = jnp.where(keep, (s - tau) / s_safe, 0.0)
    # One p x p x m product instead of two: (U diag(ratio) U^T) z.
    return ((evecs * ratio[None, :]) @ evecs.T) @ z, s


@_svt_gram_wide.defjvp
def _svt_gram_wide_jvp(primals, tangents):
    z, tau = primals
    out, s = _svt_gram_wide(z, tau)
    _, tangent = _svt_wide_tangent(z, tau, *tangents)
    return (out, s), (tangent[0], tangent[1][::-1])  # eigh orders s ascending


def _svt_rank_capped(
    z: Float[Array, "p m"], tau, basis: Float[Array, "m k"], power_iters: int
) -> tuple[Array, Array, Array]:
    # The basis is a warm start (a search direction), not differentiated.
    out, s_new, new_basis = _svt_capped(z, tau, jax.lax.stop_gradient(basis), power_iters)
    return out, jnp.sum(s_new > 0), new_basis


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _svt_capped(z, tau, basis, power_iters: int) -> tuple[Array, Array, Array]:
    """``(SVT_tau(z) on the basis' subspace, shrunk singular values, new basis)``.

    Differentiated (``diff="unrolled"``) with the exact SVT's closed form
    (:func:`_svt_wide_tangent`, from a thin SVD of ``z``), the derivative of what
    the capped map computes whenever the cap does not bind: autodiff through its
    QR and SVD divides by singular-value gaps and blows up (or returns NaN) on
    exactly low-rank or zero data.
    """
    v = basis
    for _ in range(power_iters - 1):
        q = orthonormal_factor(z @ v)
        v = orthonormal_factor(z.T @ q)
    q = orthonormal_factor(z @ v)
    # The SVD of the small wide projection q^T z by way of the QR of z^T q
    # (thin_svd): LAPACK's SVD of the k x m projection costs several times the QR
    # and the k x k SVD (0.42 against 0.30 ms per factorisation at 256 x 512,
    # k = 16, float64).
    ub, s, vt = thin_svd((z.T @ q).T)
    s_new = _shrink(s, tau)
    out = ((q @ ub) * s_new[None, :]) @ vt
    return out, s_new, vt.T


@_svt_capped.defjvp
def _svt_capped_jvp(power_iters, primals, tangents):
    z, tau, basis = primals
    dz, dtau, _ = tangents
    out, s_new, new_basis = _svt_capped(z, tau, basis, power_iters)
    if z.shape[0] <= z.shape[1]:
        _, (d_out, _) = _svt_wide_tangent(z, tau, dz, dtau)
    else:
        _, (d_out, _) = _svt_wide_tangent(z.T, tau, dz.T, dtau)
        d_out = d_out.T
    return (out, s_new, new_basis), (d_out, jnp.zeros_like(s_new), jnp.zeros_like(new_basis))


def _nuclear_value_and_direction(m, row_basis, exact, *, direction: bool) -> tuple:
    """``(||m||_*,)``, or ``(||m||_*, G)`` with ``G = U W^T`` the nuclear norm's (sub)gradient.

    Without ``exact`` the rows of ``m`` must lie in the span of the orthonormal
    columns of ``row_basis``: then ``m = (m B) B^T`` and ``m B`` (``p x k``) has
    the singular values of ``m``. With ``exact`` a thin SVD of ``m`` is run
    instead, inside a ``while_loop`` of zero or one trip: a vmapped batch pays
    for it only when one of its elements asks for it. ``G`` (and the singular
    vectors it needs) is computed only when ``direction`` is True.
    """
    dtype = m.dtype

    def summarise(a):  # a has the singular values of m
        if not direction:
            return (jnp.sum(thin_svd(a, compute_uv=False)),)
        u, s, vt = thin_svd(a)
        keep = (s > jnp.finfo(dtype).eps * jnp.max(s, initial=0.0)).astype(dtype)
        return jnp.sum(s), (u * keep[None, :]) @ vt

    capped = summarise(m @ row_basis)
    if direction:
        capped = (capped[0], capped[1] @ row_basis.T)

    def full(carry):
        del carry
        return (*summarise(m), jnp.zeros((), bool))

    *out, _ = jax.lax.while_loop(lambda carry: carry[-1], full, (*capped, jnp.asarray(exact, bool)))
    return tuple(out)


@jax.custom_jvp
def nuclear_norm_in_row_space(
    m: Float[Array, "p m"], row_basis: Float[Array, "m k"], exact: Array
) -> Array:
    """``||m||_*`` from the ``k`` columns of ``row_basis`` that span the rows of ``m``.

    The rank-capped factorisation leaves its result ``L = Q diag(s) V^T`` with
    ``V`` the new warm-start basis, so ``||L||_* = ||L V||_*``: an SVD of a
    ``p x k`` matrix instead of ``p x m``. Differentiable in ``m``: the
    derivative is ``<U W^T, dm>`` (``L = U Σ W^T`` thin, zero singular values
    left out), the nuclear norm's gradient; ``row_basis`` is treated as fixed.

    Args:
      m: the matrix (rows in the span of ``row_basis`` unless ``exact``).
      row_basis: ``(cols, k)`` orthonormal columns.
      exact: traced bool; when True the norm comes from a full SVD of ``m``
        (``row_basis`` is then ignored).

    Returns:
      The nuclear norm, a scalar.
    """
    return _nuclear_value_and_direction(m, row_basis, exact, direction=False)[0]


@nuclear_norm_in_row_space.defjvp
def _nuclear_norm_in_row_space_jvp(primals, tangents):
    m, row_basis, exact = primals
    dm = tangents[0]
    value, direction = _nuclear_value_and_direction(m, row_basis, exact, direction=True)
    return value, jnp.sum(direction * dm)


@batching.sequential_on_cpu
def capped_svt_certified(
    z: Float[Array, "p m"],
    tau,
    basis: Float[Array, "m k"],
    rank,
    low_rank: Float[Array, "p m"],
    margin,
    error_bound,
) -> Array:
    """Whether ``low_rank`` is ``SVT_tau(z)`` to within ``error_bound``, proved.

    A certificate for the rank-capped factorisation, whose warm-started subspace
    iteration can settle one rank short (a singular value just above the threshold
    nearly tied with the first one outside the subspace) or keep singular vectors
    that have not converged (a kept singular value close to the bulk below it).
    With ``V`` the first ``rank`` columns of ``basis`` (the kept right singular
    vectors), ``Z V = U S O^T`` (thin SVD) and ``V' = V O``, the matrix

    .. math::

        \tilde Z = U S V'^T + (I - U U^T) Z (I - V' V'^T)

    has ``(U, S, V')`` among its singular triplets and differs from ``Z`` by
    ``E = U U^T Z (I - V V^T)`` (``(I - UU^T) Z V = 0``). When the remaining block
    ``Y = (I - U U^T) Z`` has ``||Y||_2 <= tau + margin`` (checked exactly by a
    Cholesky factorisation of ``(tau + margin)^2 I - Y Y^T``), ``SVT_tau(Z~)`` is
    ``U (S - tau)_+ V'^T`` (up to ``margin`` per singular value), and since SVT is
    non-expansive, ``||low_rank - SVT_tau(Z)||_F <= ||low_rank - U (S - tau)_+
    V'^T||_F + ||E||_F``. True when that bound is at most ``error_bound``.

    Under ``jax.vmap`` on CPU the problems are certified one at a time
    (``sequential_on_cpu``, as :func:`thin_svd`; positional arguments only): a
    vmapped ``decompose`` over 12 λ's with this check batched never returned
    (XLA:CPU, jaxlib 0.10, 0% CPU).

    Args:
      z: the matrix thresholded.
      tau: the threshold.
      basis: ``(m, k)`` orthonormal columns, the first ``rank`` of them kept.
      rank: int scalar (may be traced), ``0 <= rank <= k``.
      low_rank: the capped result to certify.
      margin: non-negative slack added to ``tau`` for the remaining block.
      error_bound: the Frobenius error accepted.

    Returns:
      A bool scalar.
    """
    keep = (jnp.arange(basis.shape[1]) < rank).astype(z.dtype)
    v = basis * keep[None, :]
    u, s, ot = thin_svd(z @ v)  # s descending: the first `rank` are the kept ones
    u = u * keep[None, :]
    ut_z = u.T @ z
    off_block = ut_z - (ut_z @ v) @ v.T  # U^T Z (I - V V^T)
    y = z - u @ ut_z  # (I - U U^T) Z
    gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
    bound = jnp.square(tau + margin)
    factor = jnp.linalg.cholesky(bound * jnp.eye(gram.shape[0], dtype=gram.dtype) - gram)
    rows = low_rank @ v
    kept = (u * (_shrink(s, tau) * keep)[None, :]) @ ot
    distance = jnp.sqrt(
        jnp.sum(jnp.square(rows - kept)) + jnp.sum(jnp.square(low_rank - rows @ v.T))
    )
    error = distance + jnp.sqrt(jnp.sum(jnp.square(off_block)))
    return jnp.logical_and(jnp.all(jnp.isfinite(factor)), error <= error_bound)


def initial_basis(shape: tuple[int, int], rank_cap: int, dtype) -> Array:
    """Deterministic starting basis ``(cols, rank_cap)`` for ``"rank_capped"``."""
    key = jax.random.key(0)
    g = jax.random.normal(key, (shape[1], rank_cap), dtype=dtype)
    return orthonormal_factor(g)


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
    """:func:`singular_value_threshold` without argument checks (the solvers' inner call)."""
    if backend == "full":
        out, rank = _svt_full(z, tau)
        return out, rank.astype(jnp.int32), None
    if backend == "gram":
        out, rank = _svt_gram(z, tau)
        return out, rank.astype(jnp.int32), None
    if backend == "rank_capped":
        if basis is None:
            raise ValueError('backend="rank_capped" needs a basis (cols, rank_cap).')
        out, rank, new_basis = _svt_rank_capped(z, tau, basis, power_iters)
        return out, rank.astype(jnp.int32), new_basis
    raise ValueError(f"backend must be 'full', 'gram' or 'rank_capped', got {backend!r}.")
