"""NumPy transcription of the FedRot-LoRA authors' alignment, for tests.

Written from the logic of the public code (GitHub ``haoran-zh/FedRot-LoRA``):
``federatedscope/rotation_alignment_tools.py`` (``rotation_align_optimization``,
``rotation_align_optimization_soft``), the dispatch and schedule in
``federatedscope/core/workers/client.py`` and the default
``cfg.lora.rotate_lambda = 1.5`` in ``federatedscope/core/configs/cfg_llm.py``.
One client, one module at a time, in float64 (the original works in float32).
Shapes as in PEFT and in clair_jax: ``A`` is ``r x d_in``, ``B`` is ``d_out x r``.
"""

from __future__ import annotations

import numpy as np

OFFICIAL_DEFAULT_LAMBDA = 1.5  # cfg.lora.rotate_lambda


def cross_term(a, b, ref, factor):
    """The ``r x r`` matrix whose SVD gives the rotation: ``A A_ref^T`` or ``B^T B_ref``."""
    if factor == "A":
        return a @ ref.T
    if factor == "B":
        return b.T @ ref
    raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")


def hard_rotation(m):
    """``rotation_align_optimization``: ``U Vh`` of ``M``, reflections allowed."""
    u, _, vh = np.linalg.svd(m)
    return u @ vh


def soft_rotation(m, lam):
    """``rotation_align_optimization_soft``.

    ``U Vh`` of ``M``; if its determinant is negative the last row of ``Vh`` changes
    sign (a proper rotation). Unless ``lam == 1`` the result is replaced by the
    orthogonal factor ``U' Vh'`` of the SVD of ``(1 - lam) I + lam R``, with no
    determinant check.
    """
    u, _, vh = np.linalg.svd(m)
    rot = u @ vh
    if np.linalg.det(rot) < 0:
        vh = vh.copy()
        vh[-1, :] = -vh[-1, :]
        rot = u @ vh
    if lam == 1.0:
        return rot
    mix = (1.0 - lam) * np.eye(rot.shape[0]) + lam * rot
    u2, _, vh2 = np.linalg.svd(mix)
    return u2 @ vh2


def official_rotation(m, lam=OFFICIAL_DEFAULT_LAMBDA):
    """The client's dispatch: ``rotate_lambda > 1`` hard, otherwise soft."""
    return hard_rotation(m) if lam > 1.0 else soft_rotation(m, lam)


def align_client(a, b, a_ref, b_ref, factor, lam=OFFICIAL_DEFAULT_LAMBDA):
    """One client's rotated factors ``(R^T A, B R)`` and its ``R``."""
    ref = a_ref if factor == "A" else b_ref
    rot = official_rotation(cross_term(a, b, ref, factor), lam)
    return rot.T @ a, b @ rot, rot


def align_clients(A, B, A_ref, B_ref, factor, lam=OFFICIAL_DEFAULT_LAMBDA):
    """Every client of stacked ``A`` ``(n, r, q)``, ``B`` ``(n, p, r)``; returns ``(A', B', R)``."""
    out = [align_client(a, b, A_ref, B_ref, factor, lam) for a, b in zip(A, B, strict=True)]
    return tuple(np.stack(x) for x in zip(*out, strict=True))


def aligned_factor(state, initialshare="A"):
    """The factor a client aligns in round ``state`` (``None``: round 0, no alignment).

    ``swap_offset`` is 0 when ``initialshare == 'A'`` (the FedRot configuration) and
    1 otherwise; the client aligns ``A`` when ``state % 2 != swap_offset``.
    """
    if state == 0:
        return None
    swap_offset = 0 if initialshare == "A" else 1
    return "A" if state % 2 != swap_offset else "B"


def fedavg(A, B, weights):
    """The server's sample-size-weighted average of each factor."""
    p = np.asarray(weights, float) / np.sum(weights)
    return np.tensordot(p, A, 1), np.tensordot(p, B, 1)


def relative_aggregation_error(A, B, weights):
    """``||Σ p_i B_i A_i - B̄ Ā||_F / ||Σ p_i B_i A_i||_F``."""
    p = np.asarray(weights, float) / np.sum(weights)
    exact = np.einsum("n,npr,nrq->pq", p, B, A)
    a_bar, b_bar = fedavg(A, B, weights)
    return np.linalg.norm(exact - b_bar @ a_bar) / np.linalg.norm(exact)
