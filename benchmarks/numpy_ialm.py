"""Plain NumPy/SciPy inexact-ALM baseline for the block robust-PCA problem.

This module is the benchmark's *baseline*: the "usual" Robust-PCA inexact
augmented Lagrangian method (IALM) of

    Z. Lin, M. Chen and Y. Ma, "The Augmented Lagrange Multiplier Method for
    Exact Recovery of Corrupted Low-Rank Matrices", arXiv:1009.5055 (2010),
    Algorithm 5 ("inexact ALM"),

written in float64 NumPy and adapted to the block (group) norm, to an
optional unpenalised common offset ``c`` and to the penalised problem.  With
``updates`` ``X`` of shape ``(n, p, q)`` and ``M = [X_1, ..., X_n]`` (``p x nq``)
it solves either

    penalised:    min 1/2 sum_i ||X_i - c - L_i - S_i||_F^2
                      + lam_nuc ||L||_* + lam_block sum_i w_i ||S_i||_F
    constrained:  min lam_nuc ||L||_* + lam_block sum_i w_i ||S_i||_F
                  s.t. X_i = c + L_i + S_i,

where ``||L||_*`` is the nuclear norm of the ``p x nq`` matrix ``[L_1, ..., L_n]``.
The penalised problem is handled by a noise block ``N`` (cost 1/2||N||_F^2)
and the constraint ``X = c + L + S + N``.  It is not tuned: it is there to be
beaten, and to cross-check other solvers.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

__all__ = ["ialm_decompose", "objective"]

_SVDS = {
    "numpy": lambda a: np.linalg.svd(a, full_matrices=False),
    "scipy-gesvd": lambda a: scipy.linalg.svd(
        a, full_matrices=False, lapack_driver="gesvd", check_finite=False
    ),
}


def _block_norms(z):
    """Frobenius norms of the ``n`` blocks of ``z`` in ``(p, n, q)`` layout."""
    return np.sqrt(np.einsum("inj,inj->n", z, z))


def _block_soft(z, tau):
    """Block soft-threshold ``max(0, 1 - tau_i / ||z_i||_F) z_i``."""
    norms = _block_norms(z)
    scale = np.maximum(0.0, 1.0 - tau / np.maximum(norms, np.finfo(float).tiny))
    return z * scale[None, :, None]


def objective(
    updates, low_rank, sparse, offset, *, lam_nuc, lam_block, weights=None, constrained=False
):
    """Objective value (the data-fit term is dropped when ``constrained``)."""
    x, lr, sp = (np.asarray(a, dtype=np.float64) for a in (updates, low_rank, sparse))
    n, p, q = x.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    nuc = np.linalg.svd(lr.transpose(1, 0, 2).reshape(p, n * q), compute_uv=False).sum()
    blk = np.sqrt(np.einsum("nij,nij->n", sp, sp))
    val = lam_nuc * nuc + lam_block * float(w @ blk)
    if not constrained:
        val += 0.5 * float(np.sum((x - np.asarray(offset)[None] - lr - sp) ** 2))
    return float(val)


def ialm_decompose(
    updates,
    *,
    lam_nuc,
    lam_block,
    weights=None,
    offset=False,
    constrained=False,
    tol=1e-6,
    max_iter=1000,
    rho=1.5,
    svd="numpy",
    mu_max_factor=1e7,
    dual_tol=None,
):
    """Block robust PCA by the inexact ALM of Lin, Chen & Ma (2010), Alg. 5.

    This is the benchmark's baseline (arXiv:1009.5055, "inexact ALM"),
    adapted to the group norm ``sum_i w_i ||S_i||_F``, an optional common
    offset ``c`` (``offset=True``) and, unless ``constrained``, the
    penalised problem via a noise block ``N`` with ``N = mu/(1+mu) (...)``.

    Iteration (``Y`` dual, ``mu`` penalty)::

        L <- SVT(X - c - S - N + Y/mu, lam_nuc/mu)
        S <- block-soft(X - c - L - N + Y/mu, lam_block * w/mu)
        N <- mu/(1+mu) (X - c - L - S + Y/mu)        (penalised only)
        c <- mean_i(X - L - S - N + Y/mu)             (offset only)
        Y <- Y + mu (X - c - L - S - N),  mu <- min(rho mu, mu_max)

    with ``Y_0 = M / J(M)``, ``J(M) = max(||M||_2/lam_nuc,
    max_i ||M_i||_F/(lam_block w_i))`` (``M`` centred when ``offset``) and
    ``mu_0 = 1.25 lam_nuc/||M||_2``.  It stops, as Lin et al.'s Algorithm 5
    does, when the primal residual ``||X - c - L - S - N||_F/||X||_F`` is below
    ``tol`` (with ``mu`` growing geometrically, a dual-residual test
    ``mu ||delta(c + S + N)||_F/||X||_F < tol`` is rarely met on the penalised
    problem); the benchmark reports how far from the optimum that leaves it.

    ``mu_max = mu_max_factor * mu_0`` (``1e7`` as in Lin et al.'s code).  With
    ``dual_tol`` set it also requires ``mu ||delta(c + S + N)||_F/||X||_F <
    dual_tol``; that test is only reachable with a small cap: ``dual_tol=tol,
    mu_max_factor=10`` is a convergent variant (relative objective gap ~tol).
    If LAPACK gesdd fails to converge, that SVD is redone with gesvd.

    Args:
      updates: array ``(n, p, q)``.
      lam_nuc, lam_block: regularisation weights.
      weights: per-block weights ``w_i`` (default ones).
      offset: fit the unpenalised common offset ``c`` (else ``c = 0``).
      constrained: solve the equality-constrained problem.
      tol, max_iter, rho: stopping tolerance, iteration cap, ``mu`` growth.
      svd: ``"numpy"`` (LAPACK gesdd) or ``"scipy-gesvd"``.
      mu_max_factor: cap on ``mu`` relative to ``mu_0``.
      dual_tol: optional tolerance of the dual-residual test (None: no test).

    Returns:
      dict with ``low_rank`` and ``sparse`` ``(n, p, q)``, ``offset``
      ``(p, q)``, ``num_iters``, ``converged``, ``residual`` (final primal
      residual) and ``svd_time`` (seconds spent in SVD calls).
    """
    svd_fn = _SVDS[svd]
    x = np.ascontiguousarray(np.asarray(updates, dtype=np.float64).transpose(1, 0, 2))
    p, n, q = x.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    tau_s = lam_block * w
    x_norm = np.linalg.norm(x)
    if x_norm == 0.0:
        z = np.zeros((n, p, q))
        return dict(
            low_rank=z,
            sparse=z.copy(),
            offset=np.zeros((p, q)),
            num_iters=0,
            converged=True,
            residual=0.0,
            svd_time=0.0,
        )

    svd_time = 0.0

    def svt(z, tau):
        nonlocal svd_time
        t0 = time.perf_counter()
        try:
            u, s, vt = svd_fn(z.reshape(p, n * q))
        except np.linalg.LinAlgError:  # gesdd can fail to converge: use gesvd
            u, s, vt = _SVDS["scipy-gesvd"](z.reshape(p, n * q))
        svd_time += time.perf_counter() - t0
        k = int(np.count_nonzero(s > tau))
        return ((u[:, :k] * (s[:k] - tau)) @ vt[:k]).reshape(p, n, q)

    # Dual initialisation (Lin et al.: Y_0 = D / J(D)), scaled to the weights.
    y = x - x.mean(axis=1, keepdims=True) if offset else x.copy()
    norm_two = np.linalg.norm(x.reshape(p, n * q), 2)
    j = max(
        np.linalg.norm(y.reshape(p, n * q), 2) / lam_nuc, float(np.max(_block_norms(y) / tau_s))
    )
    y /= j
    mu = 1.25 * lam_nuc / norm_two
    mu_max = mu * mu_max_factor

    low = np.zeros_like(x)
    sp = np.zeros_like(x)
    nz = np.zeros_like(x)
    c = np.zeros((p, 1, q))
    primal = np.inf
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        prev = sp + nz + c
        low = svt(x - c - sp - nz + y / mu, lam_nuc / mu)
        sp = _block_soft(x - c - low - nz + y / mu, tau_s / mu)
        if not constrained:
            nz = (mu / (1.0 + mu)) * (x - c - low - sp + y / mu)
        if offset:
            c = np.mean(x - low - sp - nz + y / mu, axis=1, keepdims=True)
        r = x - c - low - sp - nz
        y += mu * r
        primal = np.linalg.norm(r) / x_norm
        dual = 0.0 if dual_tol is None else mu * np.linalg.norm(sp + nz + c - prev) / x_norm
        mu = min(rho * mu, mu_max)
        if primal < tol and (dual_tol is None or dual < dual_tol):
            converged = True
            break

    return dict(
        low_rank=low.transpose(1, 0, 2).copy(),
        sparse=sp.transpose(1, 0, 2).copy(),
        offset=c[:, 0, :].copy(),
        num_iters=it,
        converged=converged,
        residual=float(primal),
        svd_time=svd_time,
    )
