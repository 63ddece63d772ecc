"""The factor algebra the aggregation rules share.

Clients' LoRA factors are stacked on a leading axis (``B`` ``(n, p, r)``, ``A``
``(n, r, q)``) and every rule combines them without forming more than it needs:
factor-wise weighted means (FedIT), the best rank-``r`` factors of a weighted sum
of products computed through thin QR factorisations (FlexLoRA, CLAIR's benign
mean) so that the ``p x q`` product is never formed, the aggregation error every
rule reports, and the clients' factors flattened to rows (the Byzantine-robust
rules). Products and norms are taken at a safe scale (factors brought to unit
size by exact powers of two first), and half-precision factors are factorised in
float32 (:func:`~clair_jax._src.validation.working_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from clair_jax._src import validation
from clair_jax._src.aggregators import alignment
from clair_jax._src.linalg import batching
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent
from clair_jax._src.lora.types import Adapters, LoRAFactors

HIGHEST = jax.lax.Precision.HIGHEST


def factorwise_mean(factors: LoRAFactors, p: Array) -> LoRAFactors:
    """FedIT: ``(Σ p_i B_i, Σ p_i A_i)``, summed in ``p``'s dtype, in the factors' dtype."""
    return LoRAFactors(
        B=jnp.einsum("n,npr->pr", p, factors.B, precision=HIGHEST).astype(factors.B.dtype),
        A=jnp.einsum("n,nrq->rq", p, factors.A, precision=HIGHEST).astype(factors.A.dtype),
    )


def selected_mean(
    factors: LoRAFactors, p: Array, selected: Array, at_most: int | None = None
) -> LoRAFactors:
    """:func:`factorwise_mean` over the ``selected`` clients only (the others' factors,
    however large, never enter the sums: ``0 * inf`` would be NaN).

    With a static ``at_most`` (at least the number of selected clients), only the
    selected clients' factors are read: the first ``at_most`` of them are gathered,
    the positions left over get weight zero and zero factors.
    """
    if at_most is not None and at_most < selected.shape[0]:
        (index,) = jnp.nonzero(selected, size=at_most, fill_value=0)
        take = selected[index]
        factors = LoRAFactors(B=factors.B[index], A=factors.A[index])
        p, selected = jnp.where(take, p[index], 0), take
    keep = selected[:, None, None]
    return factorwise_mean(
        LoRAFactors(B=jnp.where(keep, factors.B, 0), A=jnp.where(keep, factors.A, 0)), p
    )


def errors(clients: Adapters, global_: Adapters, p: Array, key: str = "aggregation_error"):
    """``{key/<module>: ||Σ p_i B_i A_i - B_g A_g||_F}``, at a safe scale.

    The ``B``'s and the ``A``'s are brought to unit size by powers of two before
    the products are formed, and the norm scaled back (``inf`` only when the
    error itself is beyond the dtype's range).
    """
    out = {}
    for name, f in clients.items():
        g = global_[name]
        work = validation.working_dtype(f.B.dtype)
        e_b = working_exponent(jnp.concatenate([f.B.reshape(-1), g.B.reshape(-1)]).astype(work))
        e_a = working_exponent(jnp.concatenate([f.A.reshape(-1), g.A.reshape(-1)]).astype(work))
        b, a = (
            times_power_of_two(f.B.astype(work), -e_b),
            times_power_of_two(f.A.astype(work), -e_a),
        )
        b_g = times_power_of_two(g.B.astype(work), -e_b)
        a_g = times_power_of_two(g.A.astype(work), -e_a)
        out[f"{key}/{name}"] = times_power_of_two(
            alignment.product_error(a, b, p, a_g, b_g), e_a + e_b
        )
    return out


@batching.sequential_on_cpu
def _householder(z: Array) -> tuple[Array, Array, Array]:
    """``(reflectors, taus, R)`` of ``z`` (``m x k``): LAPACK's ``geqrf`` alone, ``Q`` kept
    as its Householder reflectors (``jax.lax.linalg.ormqr`` applies it), ``R`` ``min(m, k) x k``."""
    raw, taus = jnp.linalg.qr(z, mode="raw")  # raw: (k, m), the transpose of geqrf's output
    reflectors = raw.T
    return reflectors, taus, jnp.triu(reflectors[: min(z.shape), :])


@batching.sequential_on_cpu
def _apply_q(reflectors: Array, taus: Array, c: Array) -> Array:
    """``Q[:, :s] @ c`` for ``c`` ``(s, w)``, ``Q`` the ``m x m`` orthogonal factor held as
    reflectors: one ``ormqr`` on ``c`` padded with zero rows, ``O(m s w)``."""
    m = reflectors.shape[0]
    padded = jnp.pad(c, ((0, m - c.shape[0]), (0, 0)))
    return jax.lax.linalg.ormqr(reflectors, taus, padded)


def truncated_product(
    b_cat: Array, a_cat: Array, rank: int, dtype=None
) -> tuple[LoRAFactors, Array]:
    """Best rank-``rank`` factors of ``b_cat @ a_cat`` and the norm of the discarded part.

    With Householder QR factorisations ``b_cat = Q_B R_B`` and ``a_cat^T = Q_A R_A``
    the product is ``Q_B (R_B R_A^T) Q_A^T``; the SVD ``R_B R_A^T = u Σ v^T``
    (``k1 x k2``, ``k1 = min(p, k)``, ``k2 = min(q, k)``) gives the SVD of the
    product, ``U = Q_B u``, ``V = Q_A v``. Returns ``B = U_r Σ_r^{1/2}``,
    ``A = Σ_r^{1/2} V_r^T`` (Eckart–Young) and ``||b_cat a_cat - B A||_F =
    (Σ_{j > r} σ_j^2)^{1/2}``. Only LAPACK's ``geqrf`` runs on the large factors:
    ``Q_B`` and ``Q_A`` are never formed, their reflectors are applied to the
    ``rank`` singular vectors kept (``ormqr``), so the cost is two ``geqrf``
    (``O((p + q) k^2)``), one ``k1 x k2`` SVD and ``O((p + q) k rank)``; the
    ``p x q`` product is never formed. The values are those of the SVD of the
    product computed through orthogonal factors (backward stable: the error is
    of order the working precision times ``||R_B|| ||R_A||``); ranks beyond that
    of the product come out as zero columns/rows (the singular vectors stay
    orthonormal, nothing is divided).

    Args:
      b_cat: ``(p, k)`` left factor.
      a_cat: ``(k, q)`` right factor.
      rank: the rank kept (static).
      dtype: dtype of the result (default: ``b_cat``'s); factorised in at least float32.

    Returns:
      ``(LoRAFactors(B (p, rank), A (rank, q)), tail)``, ``tail`` a scalar in the
      working dtype.
    """
    dtype = b_cat.dtype if dtype is None else dtype
    work = validation.working_dtype(dtype)
    # Safe scale: both factors at unit size (exact powers of two), scaled back at the end.
    # An even total keeps the returned factors balanced (each scaled back by half of it).
    e_b, e_a = working_exponent(b_cat.astype(work)), working_exponent(a_cat.astype(work))
    e_b = e_b + (e_a + e_b) % 2
    h_b, tau_b, r_b = _householder(times_power_of_two(b_cat.astype(work), -e_b))
    h_a, tau_a, r_a = _householder(times_power_of_two(a_cat.T.astype(work), -e_a))
    u, s, vt = leading_singular(jnp.matmul(r_b, r_a.T, precision=HIGHEST), rank)
    tail = jnp.sqrt(jnp.sum(s[rank:] ** 2))
    root = jnp.sqrt(s[:rank])
    b = _apply_q(h_b, tau_b, u) * root[None, :]
    a = (_apply_q(h_a, tau_a, vt.T) * root[None, :]).T
    half = (e_a + e_b) // 2
    b, a = times_power_of_two(b, half), times_power_of_two(a, half)
    return LoRAFactors(B=b.astype(dtype), A=a.astype(dtype)), times_power_of_two(tail, e_a + e_b)


def weighted_product_error(factors: LoRAFactors, p: Array) -> tuple[LoRAFactors, Array]:
    """``(best rank-r factors of Σ_i p_i B_i A_i, the Frobenius norm of what they miss)``.

    FlexLoRA's global adapter and aggregation error: the stacked
    ``[p_1 B_1 .. p_n B_n]`` (``p x nr``) and ``[A_1; ..; A_n]`` (``nr x q``) go
    to :func:`truncated_product`; the product is never formed. The factors are
    in the factors' dtype, the error in the working dtype.
    """
    n, rows, r = factors.B.shape
    work = validation.working_dtype(factors.B.dtype)
    b = factors.B.astype(work) * p.astype(work)[:, None, None]
    b_cat = jnp.transpose(b, (1, 0, 2)).reshape(rows, n * r)
    a_cat = factors.A.reshape(n * r, factors.A.shape[2])
    return truncated_product(b_cat, a_cat, r, factors.B.dtype)


def weighted_product_factors(factors: LoRAFactors, p: Array) -> LoRAFactors:
    """Best rank-``r`` factors of ``Σ_i p_i B_i A_i`` (FlexLoRA), in the factors' dtype
    (:func:`weighted_product_error`'s factors)."""
    return weighted_product_error(factors, p)[0]


def leading_singular(m: Array, rank: int) -> tuple[Array, Array, Array]:
    """``(U_r, s, V_r^T)``: the ``rank`` leading singular vectors of ``m`` and all its
    singular values, zero-padded to ``rank`` when ``m`` has fewer (zero factors)."""
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    k = s.shape[0]
    if k < rank:
        u = jnp.pad(u, ((0, 0), (0, rank - k)))
        vt = jnp.pad(vt, ((0, rank - k), (0, 0)))
        s = jnp.pad(s, (0, rank - k))
    return u[:, :rank], s, vt[:rank]


def dense_factors(m: Array, rank: int) -> LoRAFactors:
    """Best rank-``rank`` factors ``(U_r Σ_r^{1/2}, Σ_r^{1/2} V_r^T)`` of a ``p x q`` matrix."""
    u, s, vt = leading_singular(m.astype(validation.working_dtype(m.dtype)), rank)
    root = jnp.sqrt(s[:rank])
    b, a = u * root[None, :], root[:, None] * vt
    return LoRAFactors(B=b.astype(m.dtype), A=a.astype(m.dtype))


def client_blocks(clients) -> tuple[list[Array], Callable[[list[Array]], Adapters]]:
    """Clients' factors as one ``(n, d_l)`` block of rows per leaf, and the map back.

    Like :func:`flatten_clients` without the concatenation: the coordinate-wise
    rules and the distances run leaf by leaf, so no ``(n, d)`` copy of all
    factors is made. The blocks are in the working dtype (at least float32);
    ``unblock`` maps one ``(d_l,)`` row per leaf to a pytree like one client's,
    each leaf in its own dtype.

    Args:
      clients: a pytree of arrays with a leading client axis (stacked adapters,
        a ``LoRAFactors``, rows).

    Returns:
      ``(blocks, unblock)``.

    Raises:
      ValueError: no arrays, or arrays without a common leading client axis.
    """
    leaves, treedef = jax.tree.flatten(clients)
    if not leaves:
        raise ValueError("clients holds no arrays.")
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    n = leaves[0].shape[0] if leaves[0].ndim else None
    if any(leaf.ndim == 0 or leaf.shape[0] != n for leaf in leaves):
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(f"clients' arrays must share a leading client axis, got {shapes}.")
    shapes = [leaf.shape[1:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    work = validation.working_dtype(jnp.result_type(*dtypes))
    blocks = [leaf.reshape(n, -1).astype(work) for leaf in leaves]

    def unblock(parts: list[Array]) -> Adapters:
        out = [v.reshape(s).astype(t) for v, s, t in zip(parts, shapes, dtypes, strict=True)]
        return jax.tree.unflatten(treedef, out)

    return blocks, unblock


def flatten_clients(clients: Adapters) -> tuple[Array, Callable[[Array], Adapters]]:
    """Clients' factors as rows ``(n, d)`` and a map from a ``(d,)`` row to an adapter.

    The rows are in the working dtype (at least float32, where the robust rules'
    squared distances do not overflow); ``unflatten`` returns each factor in its
    own dtype.

    Args:
      clients: stacked client adapters.

    Returns:
      ``(rows, unflatten)``: ``(n, d)`` rows and the map back to an unstacked adapter.
    """
    leaves, treedef = jax.tree.flatten(clients)
    n = leaves[0].shape[0]
    shapes = [leaf.shape[1:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    work = validation.working_dtype(jnp.result_type(*dtypes))
    rows = jnp.concatenate([leaf.reshape(n, -1).astype(work) for leaf in leaves], axis=1)

    def unflatten(v: Array) -> Adapters:
        parts, start = [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
            parts.append(v[start : start + size].reshape(shape).astype(dtype))
            start += size
        return jax.tree.unflatten(treedef, parts)

    return rows, unflatten
