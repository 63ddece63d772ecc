"""Solver demo: recover a shared subspace and the contaminated clients from noisy updates.

Run ``python -m clair_jax.demo`` (``--help`` for the flags). Every number comes
from a ``jax.random`` key, so a seed reproduces a run exactly.

The first two rows are :func:`clair_jax.decompose` with both solvers at fixed,
noise-scaled λ's (its ``rank`` is that of ``L`` there, noise directions at the
spectral edge included; the subspace error uses the top ``--rank`` directions).
The last row is :func:`clair_jax.clair`, which estimates the noise, the λ's and
the rank from the data alone and flags clients by their off-subspace residual.
Each row shows the compilation time and the time of a solve (a second call of
the compiled function, without compilation).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax as cj
from clair_jax._src import validation


def synthetic_updates(
    key, *, clients: int, rows: int, cols: int, rank: int, fraction: float, noise: float
):
    """Benign updates ``U V_i^T`` sharing a rank-``rank`` column space, a fraction arbitrary."""
    k_basis, k_coef, k_bad, k_noise, k_pick = jax.random.split(key, 5)
    basis = jnp.linalg.qr(jax.random.normal(k_basis, (rows, rank)))[0]
    coef = jax.random.normal(k_coef, (clients, rank, cols))
    updates = jnp.einsum("pr,nrq->npq", basis, coef)
    n_bad = validation.contaminated_count(fraction, clients, "fraction", "clients")
    bad = jax.random.permutation(k_pick, clients)[:n_bad]
    contaminated = jnp.zeros((clients,), bool).at[bad].set(True)
    scale = jnp.sqrt(rank / rows)
    garbage = scale * jax.random.normal(k_bad, (clients, rows, cols))
    updates = jnp.where(contaminated[:, None, None], garbage, updates)
    updates = updates + noise * jax.random.normal(k_noise, updates.shape)
    return updates, basis, contaminated


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for flag values the demo cannot run with."""
    for name in ("clients", "rows", "cols", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.rank > args.rows:
        parser.error(f"--rank ({args.rank}) must not exceed --rows ({args.rows})")
    try:
        validation.contaminated_count(args.fraction, args.clients, "--fraction", "--clients")
    except ValueError as error:
        parser.error(str(error))
    if not (np.isfinite(args.noise) and args.noise >= 0):
        parser.error(f"--noise must be finite and >= 0, got {args.noise}")


def compile_and_time(fn, *args):
    """``(fn(*args), (compile seconds, solve seconds))`` for a jitted ``fn``.

    Compiles ahead of time, runs once (first-call overheads), then times a
    second call: the solve time excludes compilation.
    """
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, (compile_seconds, time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=40, help="number of clients")
    parser.add_argument("--rows", type=int, default=64, help="rows p of each update")
    parser.add_argument("--cols", type=int, default=16, help="columns q of each update")
    parser.add_argument("--rank", type=int, default=3, help="rank of the shared subspace")
    parser.add_argument("--fraction", type=float, default=0.3, help="contaminated fraction")
    parser.add_argument("--noise", type=float, default=0.01, help="Gaussian noise level")
    parser.add_argument("--seed", type=int, default=0, help="jax.random seed")
    args = parser.parse_args(argv)
    check_args(parser, args)

    x, basis, contaminated = synthetic_updates(
        jax.random.key(args.seed),
        clients=args.clients,
        rows=args.rows,
        cols=args.cols,
        rank=args.rank,
        fraction=args.fraction,
        noise=args.noise,
    )
    n, p, q = x.shape
    # Noise-scaled penalties: the spectral norm of a p x nq Gaussian noise matrix is
    # about noise * (sqrt(p) + sqrt(nq)), a block's Frobenius norm about noise * sqrt(pq).
    lam_nuc = args.noise * (np.sqrt(p) + np.sqrt(n * q))
    lam_block = args.noise * (np.sqrt(p * q) + 2.0 * np.sqrt(np.log(n)))
    print(
        f"{n} clients, updates {p}x{q}, shared rank {args.rank}, "
        f"{int(contaminated.sum())} contaminated, noise {args.noise}"
    )
    print(f"lam_nuc = {lam_nuc:.4f}, lam_block = {lam_block:.4f}")
    header = (
        f"{'method':<6} {'iters':>5} {'conv':>5} {'rank':>4} {'subspace err':>12} "
        f"{'flagged':>7} {'precision':>9} {'recall':>6} {'compile':>8} {'solve':>8}"
    )
    print(header)
    truth = np.asarray(contaminated)

    def report(name, iters, converged, rank, u, flagged, timing):
        err = float(jnp.linalg.norm(u @ u.T - basis @ basis.T))
        tp = int(np.sum(flagged & truth))
        precision = tp / max(int(flagged.sum()), 1)
        recall = tp / max(int(truth.sum()), 1)
        print(
            f"{name:<6} {iters:>5} {converged!s:>5} {rank:>4} {err:>12.2e} "
            f"{int(flagged.sum()):>7} {precision:>9.2f} {recall:>6.2f} "
            f"{timing[0]:>7.2f}s {timing[1] * 1e3:>6.1f}ms"
        )

    for method in ("fista", "admm"):
        solve = jax.jit(
            lambda x, m=method: cj.decompose(
                x, lam_nuc=lam_nuc, lam_block=lam_block, method=m, tol=1e-6
            )
        )
        sol, timing = compile_and_time(solve, x)
        u = jnp.linalg.svd(cj.blocks_to_matrix(sol.low_rank), full_matrices=False)[0]
        flagged = np.asarray(jnp.linalg.norm(sol.sparse, axis=(1, 2)) > 1e-6)
        report(
            method,
            int(sol.num_iters),
            bool(sol.converged),
            int(sol.rank),
            u[:, : args.rank],
            flagged,
            timing,
        )

    res, timing = compile_and_time(jax.jit(cj.clair), x)
    sol = res.decomposition
    report(
        "clair",
        int(sol.num_iters),
        bool(sol.converged),
        int(res.rank),
        res.basis,  # columns beyond the estimated rank are zero
        ~np.asarray(res.collaborative),
        timing,
    )


if __name__ == "__main__":
    main()
