"""Aggregation rules whose server math never forms a ``p x q`` product.

* :func:`product_error_factored`: ``||Σ_i p_i B_i A_i - B_g A_g||_F`` from thin QR
  factorisations of the stacked factors.
* :func:`flexlora_factored`: FlexLoRA (best rank-``r`` factors of
  ``Σ_i p_i B_i A_i``) by QR of the stacked factors and an SVD of the small
  ``R_B R_A^T``; its aggregation error is the discarded tail of that spectrum.
* :func:`with_factored_errors`: any :class:`clair_jax.Aggregator` with its
  ``aggregation_error*`` diagnostics computed in factored form, jitted (the
  dense diagnostics it replaces are dead code that XLA removes).
* :func:`clair_aggregator_factored`: :func:`clair_jax.clair_aggregator`'s
  contract on :func:`clair_factored` (exact coordinates, statistics on the
  coordinates' dimensions); the per-client rank-``r`` re-factorisation of the
  refined updates is done in the coordinates (see :func:`_best_rank_factors`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from clair_jax._src import validation
from clair_jax._src.aggregators.base import (
    AggregateResult,
    Aggregator,
    make_aggregator,
)
from clair_jax._src.aggregators.clair_common import (
    check_rule_options,
    map_modules,
    module_diagnostics,
    module_mesh,
    pooled_detection,
    refine_width,
    rule_defaults,
)
from clair_jax._src.aggregators.factor_algebra import (
    factorwise_mean,
    leading_singular,
    weighted_product_error,
)
from clair_jax._src.clair import factored as fcl
from clair_jax._src.linalg import svd as svd_lib
from clair_jax._src.lora.types import LoRAFactors, check_adapters
from clair_jax._src.solvers import factored as fd

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def product_error_factored(factors: LoRAFactors, p: Array, global_: LoRAFactors) -> Array:
    """``||Σ_i p_i B_i A_i - B_g A_g||_F`` without forming a ``p x q`` matrix.

    With ``L = [p_1 B_1 .. p_n B_n, -B_g]`` and ``R = [A_1; ..; A_n; A_g]`` the
    difference is ``L R``; thin QR ``L = Q_L R_L``, ``R^T = Q_R R_R`` give
    ``||L R||_F = ||R_L R_R^T||_F`` (orthonormal ``Q``'s, never formed: only the
    ``R`` factors are computed): ``O((p + q) (n+1)^2 r^2)``.
    """
    b, a = factors.B, factors.A
    work = validation.working_dtype(jnp.result_type(b.dtype, a.dtype))
    n, rows, r = b.shape
    left = jnp.concatenate(
        [fd.stack_columns((b * p[:, None, None]).astype(work)), -global_.B.astype(work)], axis=1
    )
    right = jnp.concatenate(
        [a.reshape(n * r, a.shape[2]).astype(work), global_.A.astype(work)], axis=0
    )
    return jnp.linalg.norm(_mm(fd.thin_r(left), fd.thin_r(right.T).T))


def _top_product_factors(u, small, v, rank: int, dtype):
    """Best rank-``rank`` factors of ``u @ small @ v.T`` (orthonormal ``u``, ``v``) and the
    Frobenius norm of the discarded part."""
    uu, s, vt = leading_singular(small, rank)
    root = jnp.sqrt(s[:rank])
    b = _mm(u, uu) * root[None, :]
    a = root[:, None] * _mm(vt, v.T)
    tail = jnp.sqrt(jnp.sum(s[rank:] ** 2))
    return LoRAFactors(B=b.astype(dtype), A=a.astype(dtype)), tail


def flexlora_factored(*, screen: str = "exclude") -> Aggregator:
    """:func:`clair_jax.flexlora` with its aggregation error from the same small SVD.

    ``Σ_i p_i B_i A_i = Q_B (R_B R_A^T) Q_A^T`` (Householder QRs of ``[p_i B_i]``
    and of ``[A_i]^T``, ``Q``'s kept as reflectors); the global adapter is the
    best rank-``r`` factorisation from the SVD of ``R_B R_A^T`` (``nr x nr``) and
    the error is the norm of the discarded singular values
    (:func:`~clair_jax._src.aggregators.factor_algebra.truncated_product`). Same
    global adapter as :func:`clair_jax.flexlora` (up to the sign of singular
    vectors); no ``p x q`` product anywhere.
    """

    def core(clients, global_, p, excluded, round_index, key):
        del excluded, round_index, key
        new_global, diagnostics = {}, {}
        for name, f in clients.items():
            new_global[name], diagnostics[f"aggregation_error/{name}"] = weighted_product_error(
                f, p
            )
        n = next(iter(clients.values())).A.shape[0]
        clients_out = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), new_global)
        return AggregateResult(clients_out, new_global, jnp.zeros((n,), bool), diagnostics)

    return make_aggregator("flexlora", core, screen=screen)


def with_factored_errors(aggregator: Aggregator) -> Aggregator:
    """``aggregator`` jitted, its ``aggregation_error*/<module>`` diagnostics factored.

    ``aggregation_error/<m>`` is recomputed by :func:`product_error_factored`
    against the returned global adapter, ``aggregation_error_unaligned/<m>``
    (FedRot-LoRA) against the factor-wise mean; the dense values the rule
    computes are unused outputs, which XLA removes from the jitted program.
    Other diagnostics and the adapters are the rule's own. The errors use the
    weights the rule used after screening (``screened/weights``), and the
    screened-out clients (weight zero) do not enter the factorisations.
    """

    def inner(clients, global_, weights, round_index, key, **kw):
        res = aggregator.aggregate(clients, global_, weights, round_index, key, **kw)
        clients_c, _, p = check_adapters(clients, global_, weights, finite=False)
        p = res.diagnostics.get("screened/weights", p)
        live = (p > 0)[:, None, None]
        clients_c = {
            k: LoRAFactors(B=jnp.where(live, f.B, 0), A=jnp.where(live, f.A, 0))
            for k, f in clients_c.items()
        }
        diagnostics = dict(res.diagnostics)
        for name, f in clients_c.items():
            diagnostics[f"aggregation_error/{name}"] = product_error_factored(
                f, p, res.global_[name]
            )
            if f"aggregation_error_unaligned/{name}" in diagnostics:
                diagnostics[f"aggregation_error_unaligned/{name}"] = product_error_factored(
                    f, p, factorwise_mean(f, p)
                )
        return res._replace(diagnostics=diagnostics)

    return aggregator._replace(aggregate=jax.jit(inner))


# --- CLAIR ---------------------------------------------------------------------------------


def _best_rank_factors(shared, ys, zs, rank: int, krylov: int = 3, orthogonal: bool = False):
    """Best rank-``rank`` right/left factors of ``H_i = F + Y_i Z_i^T`` for every client.

    ``F`` (``k x m``) is shared, ``Y_i`` (``k x c``) and ``Z_i`` (``m x c``) per
    client. With ``F^T F = W D W^T`` (one eigendecomposition per module),
    ``H_i^T H_i = W (D + Δ_i) W^T`` where ``Δ_i`` has rank ``<= 2c`` and range in
    ``span(P_i, Z̃_i)`` (``P_i = (F W)^T Y_i``, ``Z̃_i = W^T Z_i``). Its top
    eigenpairs are found by Rayleigh–Ritz on
    ``span(e_1..e_t, G, D G, .., D^{krylov-1} G)`` with ``G = [P_i, Z̃_i]`` and
    ``t = 2 rank + c``: exact whenever that space is all of ``R^m`` (small
    problems), else accurate to ``O((d_{t+1} / σ_r^2)^{krylov})`` (an
    eigenvector for ``θ`` is ``(θ - D)^{-1}`` times a vector in ``span(G)``,
    whose expansion in powers of ``D / θ`` the Krylov blocks hold). Returns
    ``(s (n, rank), left (n, k, rank), right (n, m, rank))`` with
    ``H_i ≈ left_i diag(s_i) right_i^T``. With ``orthogonal`` (static: ``F^T Y_i = 0``,
    as when ``Y_i`` spans the refinement's subspace and ``F`` the consensus outside
    it) ``P_i = 0`` and ``G = Z̃_i``, a Krylov space half as wide.
    """
    k, m = shared.shape
    n, _, c = ys.shape
    d, w = jnp.linalg.eigh(_mm(shared.T, shared))
    d, w = d[::-1], w[:, ::-1]
    d = jnp.maximum(d, 0.0)
    fw = _mm(shared, w)  # (k, m)
    t = min(m, 2 * rank + c)
    width = c if orthogonal else 2 * c
    dim = min(m, t + krylov * width)
    exact = dim >= m

    def one(y, z):
        zt = _mm(w.T, z)  # (m, c)
        pp = _mm(fw.T, y)  # (m, c)
        g = y.T @ y
        if exact:
            s_basis = jnp.eye(m, dtype=shared.dtype)
        else:
            blocks = [jnp.eye(m, t, dtype=shared.dtype)]
            cur = zt if orthogonal else jnp.concatenate([pp, zt], axis=1)
            for _ in range(krylov):
                blocks.append(cur)
                cur = d[:, None] * cur
            s_basis = svd_lib.orthonormal_factor(jnp.concatenate(blocks, axis=1))
        sp, sz = _mm(s_basis.T, pp), _mm(s_basis.T, zt)
        proj = _mm(s_basis.T * d[None, :], s_basis)
        proj = proj + _mm(sp, sz.T) + _mm(sz, sp.T) + _mm(_mm(sz, g), sz.T)
        proj = 0.5 * (proj + proj.T)
        theta, vec = svd_lib.symmetric_eigh(proj)
        theta, vec = theta[::-1][:rank], vec[:, ::-1][:, :rank]
        if theta.shape[0] < rank:  # fewer dimensions than the rank: zero factors
            theta = jnp.pad(theta, (0, rank - theta.shape[0]))
            vec = jnp.pad(vec, ((0, 0), (0, rank - vec.shape[1])))
        x = _mm(s_basis, vec)  # (m, rank) in W coordinates
        s = jnp.sqrt(jnp.maximum(theta, 0.0))
        hx = _mm(fw, x) + _mm(y, _mm(zt.T, x))  # H_i W x: (k, rank)
        left = hx / jnp.where(s > 0, s, 1.0)[None, :]
        return s, left, _mm(w, x)

    # Batched products; the factorisations run one client at a time on CPU (svd_lib).
    return jax.vmap(one)(ys, zs)


def clair_aggregator_factored(
    *,
    shared_space: str = "column",
    measure: str = "adapter",
    detection: str = "module",
    flagged: str = "trained",
    refine_rank: int | str | None = "lora",
    benign_majority: bool = True,
    screen: str = "exclude",
    devices=None,
    **clair_kwargs,
) -> Aggregator:
    """:func:`clair_jax.clair_aggregator` on LoRA factors, with no ``p x q`` product.

    What ``clair_aggregator()`` returns by default (``server_math="factored"``).
    Same arguments, diagnostics and returned adapters as
    :func:`clair_jax.clair_aggregator` (read its docstring for the rules);
    CLAIR runs as :func:`clair_factored` on the exact coordinates of
    ``X_i = B_i A_i`` (``measure="update"``: of ``[B_i, -B_i^0] [A_i; A_i^0]``),
    so the statistics follow the coordinates' dimensions (the ``n r < min(p, q)``
    fix; with given ``lam_nuc``, ``lam_block`` and ``noise_scale`` the flags,
    scores and refined updates are the dense rule's). The refined updates live in
    the frame ``U`` (stacked ``B``'s) × ``V_A`` (stacked ``A``'s), where each
    client's is ``F + Y_i Z_i^T`` with ``F`` shared; the rank-``r`` factors each
    client receives come from :func:`_best_rank_factors` (exact for small frames,
    Rayleigh–Ritz on a Krylov space otherwise) and the global adapter from one
    SVD of the frame's ``nr x nr`` coefficient matrix. With ``offset=True`` the
    coordinates use the common right frame ``V_A`` (:func:`clair_factored`),
    the one the refinement works in.

    Raises:
      ValueError: as :func:`clair_jax.clair_aggregator`.
    """
    check_rule_options(shared_space, measure, detection, flagged, refine_rank, clair_kwargs)
    mesh = module_mesh(devices)
    clair_kwargs = rule_defaults(clair_kwargs)
    keep_trained = flagged == "trained"
    row = shared_space == "row"

    def module_fit(f: LoRAFactors, f0: LoRAFactors | None, excluded):
        b, a = f.B, f.A
        if f0 is not None:
            b = jnp.concatenate([b, -f0.B], axis=2)
            a = jnp.concatenate([a, f0.A], axis=1)
        # Screened-out clients send nothing: zero updates (see clair_aggregator).
        b = jnp.where(excluded[:, None, None], 0.0, b)
        if row:
            b, a = jnp.swapaxes(a, 1, 2), jnp.swapaxes(b, 1, 2)
        res = fcl.clair_factored(
            LoRAFactors(b, a),
            contaminated="refine",
            benign_majority=benign_majority,
            exclude=excluded,
            **clair_kwargs,
        )
        return (b, a), res

    def core(clients, global_, p, excluded, round_index, key, start=None) -> AggregateResult:
        del round_index, key
        n = next(iter(clients.values())).A.shape[0]
        if n < 2:
            raise ValueError(
                f"clair_aggregator needs clients from at least 2 clients (CLAIR tells them "
                f"apart by comparing them), got factors with a client axis of {n}."
            )
        update = measure == "update"
        # Modules of one shape share one compiled CLAIR (and one compiled output step).
        fits = map_modules(
            lambda inputs: module_fit(*inputs, excluded),
            {name: (f, start[name] if update else None) for name, f in clients.items()},
            mesh,
        )
        diagnostics = {}
        outliers = jnp.zeros((n,), bool)
        for name, f in clients.items():
            _, res = fits[name]
            outliers = outliers | ~res.collaborative
            width = refine_width(refine_rank, f.A.shape[1], res.basis.shape[1])
            diagnostics.update(module_diagnostics(name, res, res.coordinates.decomposition, width))
            diagnostics[f"noise_scale/{name}"] = res.noise_scale
        if detection == "client":
            scores = jnp.stack([res.scores for _, res in fits.values()])
            outliers, client_scores, client_threshold = pooled_detection(scores)
            diagnostics["client_scores"] = client_scores
            diagnostics["client_threshold"] = client_threshold
        collaborative = ~outliers

        def outputs(inputs):
            f, (b, a), res, members = inputs
            width = refine_width(refine_rank, f.A.shape[1], res.basis.shape[1])
            return _module_outputs(f, b, a, res, width, members, p, row, update)

        def members_of(res):
            members = collaborative if detection == "client" else res.collaborative
            return members & ~excluded  # screened-out clients join no consensus

        outs = map_modules(
            outputs,
            {name: (f, *fits[name], members_of(fits[name][1])) for name, f in clients.items()},
            mesh,
        )
        new_clients, new_global = {}, {}
        for name, (client_factors, global_factors, error) in outs.items():
            new_clients[name], new_global[name] = client_factors, global_factors
            diagnostics[f"aggregation_error/{name}"] = error
        keep = collaborative[:, None, None]
        if keep_trained:
            fallback = clients
        else:
            fallback = {name: LoRAFactors(g.B[None], g.A[None]) for name, g in new_global.items()}
        new_clients = {
            name: LoRAFactors(
                B=jnp.where(keep, f.B, fallback[name].B),
                A=jnp.where(keep, f.A, fallback[name].A),
            )
            for name, f in new_clients.items()
        }
        return AggregateResult(new_clients, new_global, outliers, diagnostics)

    return make_aggregator("clair", core, screen=screen, uses_start=measure == "update")


def _weighted_frame_sum(c: Array, beta: Array, t_blocks: Array) -> Array:
    """``Σ_i c_i beta_i t_blocks_i`` (``k x m``) as one ``(k, n s) @ (n s, m)`` product."""
    n, k, s_r = beta.shape
    left = jnp.transpose(c[:, None, None] * beta, (1, 0, 2)).reshape(k, n * s_r)
    return _mm(left, t_blocks.reshape(n * s_r, t_blocks.shape[2]))


def _module_outputs(f, b, a, res, width, members, p, row, update):
    """Client adapters, global adapter and aggregation error of one module, factored.

    Frame: ``U`` (``res.left_basis``, ``p x k``) and ``V_A`` from the thin QR of the
    stacked ``A``'s (``A_stack^T = V_A T``); client ``i``'s stacked update is
    ``U G_i A_stack`` with ``G_i`` its ``U^T B_i`` in column block ``i``, i.e.
    ``U (G_i T^T) V_A^T``.
    """
    n, _, s_r = b.shape  # s_r = r (adapter) or 2r (update)
    r = f.A.shape[1]
    dtype = f.B.dtype
    u = res.left_basis
    # V_A and A_i V_A: (q', m), (n, s_r, m), from CLAIR's run when it computed them.
    if res.right_frame is None:
        v_a, t_blocks = fd.common_right_basis(a.astype(res.left_coef.dtype))
    else:
        v_a, t_blocks = res.right_frame
    beta = res.left_coef  # U^T B_i (n, k, s_r), from the QR that gave U
    # Client i's update in the frame is beta_i @ t_blocks_i (k x m; with "update" the
    # first r columns are the adapter B_i A_i, the rest minus the start). The (n, k, m)
    # stack of them is never formed: weighted sums over clients are one product of the
    # (k, n s_r) and (n s_r, m) stacks, projections go through beta_i first.
    basis = res.coordinates.basis[:, :width]  # Û_c, (k, width)
    weight = members.astype(beta.dtype)
    count = jnp.sum(weight)
    uniform = jnp.full_like(weight, 1.0 / n)
    consensus = _weighted_frame_sum(
        jnp.where(count > 0, weight / jnp.maximum(count, 1.0), uniform), beta, t_blocks
    )
    # Refined + origin: (I - P) X̄ + P X_i + O_i = F + Y_i Z_i^T with F = (I - P) X̄ shared.
    shared = consensus - _mm(basis, _mm(basis.T, consensus))
    ys = jnp.broadcast_to(basis, (n, *basis.shape))
    if update:
        ys = jnp.concatenate([ys, beta[:, :, r:]], axis=2)
    # (P X_i)'s right part: (Û_c^T beta_i) t_blocks_i, transposed.
    inner = jnp.einsum("kw,nkr->nwr", basis, beta, precision=_HIGHEST)
    z_own = jnp.einsum("nwr,nrm->nmw", inner, t_blocks, precision=_HIGHEST)
    if update:
        # O_i = -(beta_i[:, r:] @ t_blocks_i[r:]) (b holds -B^0): Y = beta_i[:, r:].
        zs = jnp.concatenate([z_own, -jnp.swapaxes(t_blocks[:, r:], 1, 2)], axis=2)
    else:
        zs = z_own
    # Adapters: Y_i = Û_c for all clients and F = (I - P) X̄ is orthogonal to it.
    svals, left, right = _best_rank_factors(shared, ys, zs, r, orthogonal=not update)
    root = jnp.sqrt(svals)  # (n, r)
    new_b = jnp.einsum("pk,nkr->npr", u, left * root[:, None, :], precision=_HIGHEST)
    new_a = jnp.einsum("qm,nmr->nrq", v_a, right * root[:, None, :], precision=_HIGHEST)
    if row:
        new_b, new_a = jnp.swapaxes(new_a, 1, 2), jnp.swapaxes(new_b, 1, 2)
    clients_out = LoRAFactors(new_b.astype(dtype), new_a.astype(dtype))
    # Global adapter: best rank-r of the members' weighted mean adapter; error vs Σ p_i.
    w = jnp.where(members, p, 0.0)
    equal = members.astype(p.dtype)
    w = jnp.where(jnp.sum(w) > 0, w, jnp.where(jnp.sum(equal) > 0, equal, p))
    w = w / jnp.sum(w)
    mean_c = _weighted_frame_sum(w, beta[:, :, :r], t_blocks[:, :r])
    glob, _ = _top_product_factors(u, mean_c, v_a, r, dtype)
    glob_c = _mm(_mm(u.T, glob.B.astype(u.dtype)), _mm(glob.A.astype(u.dtype), v_a))
    exact_c = _weighted_frame_sum(p.astype(beta.dtype), beta[:, :, :r], t_blocks[:, :r])
    error = jnp.linalg.norm(exact_c - glob_c)
    if row:
        glob = LoRAFactors(glob.A.T, glob.B.T)
    return clients_out, glob, error
