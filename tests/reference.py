"""Independent float64 reference for the low-rank + block-sparse decomposition.

Data ``updates`` X has shape (n, p, q): n clients, each a p x q matrix. Side by side
they form ``M = [X_1, ..., X_n]`` of shape (p, n q). We seek ``L``, ``S`` (shape
(n, p, q)) and an optional common offset ``c`` (shape (p, q), zero when
``offset=False``) solving either

* penalised:   min 1/2 sum_i ||X_i - c - L_i - S_i||_F^2 + lam_nuc ||L||_* + lam_block R(S)
* constrained: min lam_nuc ||L||_* + lam_block R(S)  s.t.  X_i = c + L_i + S_i for all i,

with ``||L||_*`` the nuclear norm of the p x nq matrix ``[L_1, ..., L_n]`` and
``R(S) = sum_i w_i ||S_i||_F``. Nothing here imports ``clair_jax``: the solvers are
deliberately different from the library's (block-coordinate descent and
Douglas-Rachford in NumPy, interior point via cvxpy).
"""

from __future__ import annotations

import warnings

import numpy as np

# Recommended (lam_nuc, lam_block), from grid searches with numpy_decompose.
# "penalised": rank(L) in [1, min(p, nq) - 1] and some but not all S_i nonzero in 40/40
#   cases of make_problem(seed, n=6, p=8, q=3, rank=2, n_outliers=2, noise=0 or 0.1),
#   seeds 0..9, offset False/True, weights None or U[0.5, 1.5]; S picks exactly the
#   outliers in ~60% of them.
# "constrained": same criterion, noiseless data only (with noise L goes full rank);
#   40/40 for lam_block in [0.9, 1.3], exact outlier set in ~70%.
# "recovery": constrained, offset=False, make_problem(seed, n=12, p=20, q=3, rank=2,
#   n_outliers=3): column space of L and outlier set recovered exactly, seeds 0..9,
#   for lam_block in [0.75, 1.05] (both numpy_decompose and CLARABEL).
RECOMMENDED_LAMBDAS: dict[str, dict[str, float]] = {
    "penalised": {"lam_nuc": 1.0, "lam_block": 1.0},
    "constrained": {"lam_nuc": 1.0, "lam_block": 1.2},
    "recovery": {"lam_nuc": 1.0, "lam_block": 0.9},
}


# Tighter-than-default solver tolerances. On the penalised problem CLARABEL then agrees
# with numpy_decompose to ~1e-7 (vs ~1e-5 by default). On the constrained problem it
# often stops "almost solved" (status optimal_inaccurate) ~1e-5 from the optimum, as it
# does with default tolerances; there SCS at these settings agrees to ~1e-9.
_TIGHT: dict[str, dict[str, float]] = {
    "CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10},
    "SCS": {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 500000},
}


def _stack(x: np.ndarray) -> np.ndarray:
    """(n, p, q) -> (p, n q), i.e. ``[x_1, ..., x_n]``."""
    n, p, q = x.shape
    return x.transpose(1, 0, 2).reshape(p, n * q)


def _unstack(m: np.ndarray, n: int) -> np.ndarray:
    """(p, n q) -> (n, p, q); inverse of :func:`_stack`."""
    p = m.shape[0]
    return m.reshape(p, n, -1).transpose(1, 0, 2)


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """Per-client weights as a float64 vector of length n (default all ones)."""
    return np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)


def svt(z: np.ndarray, tau: float) -> np.ndarray:
    """Singular value thresholding of the stacked matrix of ``z`` (n, p, q).

    Args:
        z: Array of shape (n, p, q).
        tau: Threshold applied to the singular values of ``[z_1, ..., z_n]``.

    Returns:
        Array of shape (n, p, q): the prox of ``tau ||.||_*`` at ``z``.
    """
    u, s, vt = np.linalg.svd(_stack(z), full_matrices=False)
    return _unstack((u * np.maximum(s - tau, 0.0)) @ vt, z.shape[0])


def block_shrink(z: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Block soft-thresholding ``S_i = max(0, 1 - tau_i / ||z_i||_F) z_i``.

    Args:
        z: Array of shape (n, p, q).
        tau: Per-block thresholds, shape (n,).

    Returns:
        Array of shape (n, p, q): the prox of ``sum_i tau_i ||.||_F`` at ``z``.
    """
    norms = np.sqrt(np.sum(z * z, axis=(1, 2)))
    scale = np.maximum(0.0, 1.0 - tau / np.where(norms > 0, norms, 1.0))  # z_i = 0: any
    return z * scale[:, None, None]


def objective(
    updates: np.ndarray,
    low_rank: np.ndarray,
    sparse: np.ndarray,
    offset: np.ndarray | None,
    *,
    lam_nuc: float,
    lam_block: float,
    weights: np.ndarray | None = None,
    constrained: bool = False,
) -> float:
    """Objective value of a candidate decomposition.

    Args:
        updates: Data X, shape (n, p, q).
        low_rank: L, shape (n, p, q).
        sparse: S, shape (n, p, q).
        offset: c, shape (p, q), or None for c = 0.
        lam_nuc: Weight of the nuclear norm of ``[L_1, ..., L_n]``.
        lam_block: Weight of ``sum_i w_i ||S_i||_F``.
        weights: Per-client weights w, shape (n,); default all ones.
        constrained: If True return only the two penalty terms (feasibility is not
            checked); otherwise add the quadratic misfit ``1/2 ||X - c - L - S||^2``.

    Returns:
        The objective as a Python float.
    """
    x, l, s = (np.asarray(a, dtype=np.float64) for a in (updates, low_rank, sparse))
    w = _weights(weights, x.shape[0])
    val = lam_nuc * np.linalg.svd(_stack(l), compute_uv=False).sum()
    val += lam_block * float(np.dot(w, np.sqrt(np.sum(s * s, axis=(1, 2)))))
    if not constrained:
        c = 0.0 if offset is None else np.asarray(offset, dtype=np.float64)
        val += 0.5 * float(np.sum((x - c - l - s) ** 2))
    return float(val)


def numpy_decompose(
    updates: np.ndarray,
    *,
    lam_nuc: float,
    lam_block: float,
    weights: np.ndarray | None = None,
    offset: bool = False,
    constrained: bool = False,
    tol: float = 1e-12,
    max_iter: int = 100000,
) -> dict:
    """Plain NumPy solver, independent of the library's FISTA / ADMM.

    Penalised problem: exact block-coordinate descent (Gauss-Seidel) over the blocks
    L, S, c; each step minimises the objective exactly in one block::

        L <- SVT(X - c - S, lam_nuc)
        S_i <- block_shrink(X_i - c - L_i, lam_block w_i)
        c <- mean_i(X_i - L_i - S_i)        (only if offset)

    The coupling term is smooth and the non-smooth terms are block separable, so
    every limit point is a minimiser (Tseng, 2001).

    Constrained problem: Douglas-Rachford (ADMM in consensus form) with fixed
    penalty ``rho``, splitting ``f(L, S) = lam_nuc ||L||_* + lam_block R(S)`` from the
    indicator of the affine set ``A = {(L, S): X - L - S = [c, ..., c] for some c}``
    (``c = 0`` without offset)::

        (L, S) <- (SVT(Lz - Lu, lam_nuc / rho), block_shrink(Sz - Su, lam_block w / rho))
        (Lz, Sz) <- P_A(L + Lu, S + Su)
        (Lu, Su) <- (Lu, Su) + (L, S) - (Lz, Sz)

    where ``P_A(a, b) = (a + d, b + d)``, ``d = (r - mean_i r_i) / 2``,
    ``r = X - a - b`` (no mean subtraction without offset). ``rho`` is fixed to
    ``lam_nuc / (0.05 sigma_max(M))``; DR converges for any fixed ``rho > 0``. The
    returned L and S are the prox iterates (exactly low-rank / block-sparse) and
    ``c = mean_i(X_i - L_i - S_i)``, so the constraint holds up to ``~tol``.

    Args:
        updates: Data X, shape (n, p, q).
        lam_nuc: Nuclear-norm weight.
        lam_block: Block-norm weight.
        weights: Per-client weights, shape (n,); default all ones.
        offset: Whether to fit the common offset c.
        constrained: Solve the constrained instead of the penalised problem.
        tol: Stop when the largest change (and, for DR, the primal residual)
            is below ``tol * max(1, ||X||_F)``.
        max_iter: Iteration cap.

    Returns:
        Dict with ``low_rank`` (n, p, q), ``sparse`` (n, p, q), ``offset`` (p, q)
        (zeros when ``offset=False``) and ``num_iters``.
    """
    x = np.asarray(updates, dtype=np.float64)
    n = x.shape[0]
    w = _weights(weights, n)
    thresh = tol * max(1.0, float(np.linalg.norm(x)))
    l, s, c = np.zeros_like(x), np.zeros_like(x), np.zeros(x.shape[1:])
    it = 0
    if not constrained:
        while it < max_iter:
            it += 1
            l_new = svt(x - c - s, lam_nuc)
            s_new = block_shrink(x - c - l_new, lam_block * w)
            c_new = (x - l_new - s_new).mean(axis=0) if offset else c
            change = max(np.abs(l_new - l).max(), np.abs(s_new - s).max(), np.abs(c_new - c).max())
            l, s, c = l_new, s_new, c_new
            if change < thresh:
                break
    else:
        sigma = np.linalg.norm(_stack(x), 2)
        rho = lam_nuc / (0.05 * sigma) if sigma > 0 else 1.0
        lz, sz, lu, su = x.copy(), np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
        while it < max_iter:
            it += 1
            l = svt(lz - lu, lam_nuc / rho)
            s = block_shrink(sz - su, lam_block * w / rho)
            r = x - (l + lu) - (s + su)
            d = 0.5 * (r - r.mean(axis=0) if offset else r)
            lz_new, sz_new = l + lu + d, s + su + d
            lu, su = lu + l - lz_new, su + s - sz_new
            primal = max(np.abs(l - lz_new).max(), np.abs(s - sz_new).max())
            dual = max(np.abs(lz_new - lz).max(), np.abs(sz_new - sz).max())
            lz, sz = lz_new, sz_new
            if max(primal, dual) < thresh:
                break
        c = (x - l - s).mean(axis=0) if offset else c
    return {"low_rank": l, "sparse": s, "offset": c, "num_iters": it}


def cvxpy_decompose(
    updates: np.ndarray,
    *,
    lam_nuc: float,
    lam_block: float,
    weights: np.ndarray | None = None,
    offset: bool = False,
    constrained: bool = False,
    sparsity: str = "block",
    solver: str = "CLARABEL",
    solver_opts: dict | None = None,
) -> dict:
    """Solve either problem with cvxpy (meant for small sizes: n<=8, p<=8, q<=4).

    Args:
        updates: Data X, shape (n, p, q).
        lam_nuc: Nuclear-norm weight (``cp.normNuc`` of the p x nq matrix).
        lam_block: Block-norm weight (``cp.norm(., "fro")`` per block).
        weights: Per-client weights, shape (n,); default all ones.
        offset: Whether to fit the common offset c.
        constrained: Solve the constrained instead of the penalised problem.
        sparsity: ``"block"`` (Frobenius norm of each client's block) or
            ``"entry"`` (sum of the block's absolute entries).
        solver: cvxpy solver name.
        solver_opts: Keyword arguments for ``Problem.solve``; default: tight
            tolerances for CLARABEL and SCS (see ``_TIGHT``), none otherwise.

    Returns:
        Dict with ``low_rank``, ``sparse`` (n, p, q), ``offset`` (p, q), the
        ``objective`` reported by the solver and the cvxpy ``status`` (``"optimal"``
        or ``"optimal_inaccurate"``; anything else raises ``RuntimeError``).
    """
    import cvxpy as cp

    x = np.asarray(updates, dtype=np.float64)
    n, p, q = x.shape
    w = _weights(weights, n)
    m = _stack(x)
    l_var, s_var = cp.Variable((p, n * q)), cp.Variable((p, n * q))
    c_var = cp.Variable((p, q)) if offset else None
    c_rep = cp.hstack([c_var] * n) if offset else np.zeros((p, n * q))
    norm = {"block": lambda b: cp.norm(b, "fro"), "entry": lambda b: cp.sum(cp.abs(b))}[sparsity]
    blocks = [norm(s_var[:, i * q : (i + 1) * q]) for i in range(n)]
    penalty = lam_nuc * cp.normNuc(l_var) + lam_block * (w @ cp.hstack(blocks))
    if constrained:
        prob = cp.Problem(cp.Minimize(penalty), [l_var + s_var + c_rep == m])
    else:
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(m - c_rep - l_var - s_var) + penalty))
    opts = _TIGHT.get(solver, {}) if solver_opts is None else solver_opts
    with warnings.catch_warnings():  # "solution may be inaccurate": reported via status
        warnings.simplefilter("ignore")
        prob.solve(solver=solver, **opts)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"cvxpy failed: {prob.status}")
    return {
        "low_rank": _unstack(l_var.value, n),
        "sparse": _unstack(s_var.value, n),
        "offset": c_var.value if offset else np.zeros((p, q)),
        "objective": float(prob.value),
        "status": prob.status,
    }


def make_problem(
    seed: int,
    n: int = 8,
    p: int = 10,
    q: int = 3,
    rank: int = 2,
    n_outliers: int = 2,
    noise: float = 0.0,
) -> dict:
    """Synthetic low-rank + block-sparse data.

    Benign blocks are ``X_i = U V_i^T`` with a shared orthonormal ``U`` (p, rank) and
    Gaussian ``V_i`` (q, rank); outlier blocks are Gaussian p x q matrices rescaled to
    the mean Frobenius norm of the benign blocks. Optional i.i.d. Gaussian noise of
    standard deviation ``noise`` is added to ``updates`` only.

    Args:
        seed: Seed for ``numpy.random.default_rng``.
        n: Number of clients.
        p: Rows per block.
        q: Columns per block.
        rank: Rank of the shared column space.
        n_outliers: Number of outlier clients (chosen at random).
        noise: Noise standard deviation.

    Returns:
        Dict with ``updates``, ``low_rank``, ``sparse`` (n, p, q), ``outliers``
        (bool mask (n,)) and ``basis`` U (p, rank).
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((p, rank)))
    low_rank = np.einsum("pr,nqr->npq", basis, rng.standard_normal((n, q, rank)))
    outliers = np.zeros(n, dtype=bool)
    outliers[rng.choice(n, size=n_outliers, replace=False)] = True
    low_rank[outliers] = 0.0
    scale = np.mean(np.linalg.norm(low_rank[~outliers], axis=(1, 2))) if (~outliers).any() else 1.0
    sparse = np.zeros_like(low_rank)
    out = rng.standard_normal((n_outliers, p, q))
    sparse[outliers] = out * (scale / np.linalg.norm(out, axis=(1, 2)))[:, None, None]
    updates = low_rank + sparse + noise * rng.standard_normal(low_rank.shape)
    return {
        "updates": updates,
        "low_rank": low_rank,
        "sparse": sparse,
        "outliers": outliers,
        "basis": basis,
    }
