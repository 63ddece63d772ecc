"""Classic Robust PCA: ``clair_jax.rpca`` against tensorly's ``robust_pca``.

Same problems (Candès et al.'s model: a random rank-r matrix plus a fraction of
entries replaced by gross errors uniform in [-50, 50]), same problem solved
(Principal Component Pursuit with ``lambda = 1/sqrt(max(m, N))``), same
tolerance, both libraries in one run, float64 on the CPU.

tensorly's matrix objective sums the nuclear norms of both unfoldings
(``2 reg_J ||D||_*``), so it runs with ``reg_J = 1/2, reg_E = lambda``: exactly
``||L||_* + lambda ||S||_1``. Its stopping test is absolute
(``||M - D - E||_F <= tol`` and ``||D - J_i||_F <= tol``) where ours is relative
to ``||M||_F``, so it gets ``tol * ||M||_F``: the same relative tolerance. It
keeps its own defaults otherwise (``mu_init=1e-4``, ``learning_rate=1.1``) with
the iteration cap raised to 5000.

Reported: wall time (median of ``--repeats`` for JAX after one compile call,
one call for tensorly, whose runs take seconds), iterations, relative error of
``L`` against the planted low-rank matrix, and the ratio tensorly / clair_jax.

Usage::

    python benchmarks/rpca_vs_tensorly.py --quick   # 256x512 and 2048x4096, a few minutes
    python benchmarks/rpca_vs_tensorly.py           # up to 2048x4096

Writes ``benchmarks/out/rpca_vs_tensorly.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _environment import environment  # noqa: E402

import clair_jax as cj  # noqa: E402

TOL = 1e-6


def make_problem(seed: int, m: int, n_cols: int, rank: int, fraction: float):
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n_cols))
    mask = rng.random((m, n_cols)) < fraction
    sparse = np.where(mask, rng.uniform(-50.0, 50.0, (m, n_cols)), 0.0)
    return low, sparse


def rel_err(estimate, truth) -> float:
    return float(np.linalg.norm(np.asarray(estimate) - truth) / np.linalg.norm(truth))


def run_tensorly(data: np.ndarray, lam: float):
    from tensorly.decomposition import robust_pca

    start = time.perf_counter()
    low, _, errors = robust_pca(
        data,
        reg_E=lam,
        reg_J=0.5,
        tol=TOL * np.linalg.norm(data),
        n_iter_max=5000,
        return_errors=True,
        verbose=0,
    )
    return time.perf_counter() - start, low, len(errors)


def run_ours(data: np.ndarray, svd: str, rank_cap: int | None, repeats: int):
    solve = jax.jit(lambda m: cj.rpca(m, tol=TOL, svd=svd, rank_cap=rank_cap, max_iter=5000))
    x = jnp.asarray(data)
    res = jax.block_until_ready(solve(x))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        res = jax.block_until_ready(solve(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output folder")
    args = parser.parse_args(argv)
    import tensorly

    if args.quick:  # the headline size and the largest size (ours only)
        cases = [(256, 512, 4, 0.05), (2048, 4096, 5, 0.05)]
    else:
        cases = [(256, 512, 4, 0.05), (256, 512, 20, 0.1), (1024, 2048, 10, 0.05)]
        cases += [(1024, 2048, 50, 0.2), (2048, 4096, 5, 0.05), (2048, 4096, 50, 0.1)]
    # tensorly's full SVDs of the largest sizes take many minutes: it runs on
    # the sizes below this many entries only.
    tensorly_max_entries = 1024 * 2048
    results = {
        "machine": environment(tensorly=tensorly.__version__),
        "tol": TOL,
        "rows": [],
    }
    print(f"# machine: {results['machine']}")
    print(
        "\n| m x N | rank | corrupted | library | backend | iters | time (s) | rel. error of L "
        "| tensorly / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m, n_cols, rank, fraction in cases:
        low, sparse = make_problem(0, m, n_cols, rank, fraction)
        data = low + sparse
        lam = 1.0 / np.sqrt(max(m, n_cols))
        t_tl = None
        if m * n_cols <= tensorly_max_entries:
            t_tl, low_tl, iters_tl = run_tensorly(data, lam)
            row = dict(
                m=m,
                N=n_cols,
                rank=rank,
                fraction=fraction,
                library="tensorly",
                backend="numpy svd",
                iters=iters_tl,
                time_s=t_tl,
                rel_error=rel_err(low_tl, low),
            )
            results["rows"].append(row)
            print_row(row)
        cap = min(4 * rank + 16, min(m, n_cols))
        for svd, rank_cap in (("auto", None), ("rank_capped", cap)):
            if svd == "auto" and m * n_cols > tensorly_max_entries:
                continue  # the exact factorisations of 2048 x 4096 take minutes per solve
            t, res = run_ours(data, svd, rank_cap, args.repeats)
            row = dict(
                m=m,
                N=n_cols,
                rank=rank,
                fraction=fraction,
                library="clair_jax",
                backend=f"{svd}" + (f" (cap {rank_cap})" if rank_cap else ""),
                iters=int(res.num_iters),
                time_s=t,
                rel_error=rel_err(res.low_rank, low),
                converged=bool(res.converged),
                speedup=None if t_tl is None else t_tl / t,
            )
            results["rows"].append(row)
            print_row(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rpca_vs_tensorly.json").write_text(json.dumps(results, indent=2))
    plot(results["rows"], out / "rpca_vs_tensorly.png")
    print(f"\nwrote {out / 'rpca_vs_tensorly.json'} and {out / 'rpca_vs_tensorly.png'}")


def print_row(r):
    speed = f"{r['speedup']:.0f}x" if r.get("speedup") else "-"
    print(
        f"| {r['m']} x {r['N']} | {r['rank']} | {r['fraction']:.0%} | {r['library']} "
        f"| {r['backend']} | {r['iters']} | {r['time_s']:.3f} | {r['rel_error']:.1e} | {speed} |",
        flush=True,
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(
        {f"{r['m']}x{r['N']} r{r['rank']} {r['fraction']:.0%}" for r in rows},
        key=lambda s: (int(s.split("x")[0]), s),
    )
    series = sorted({(r["library"], r["backend"]) for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for k, (lib, backend) in enumerate(series):
        xs, ys = [], []
        for j, label in enumerate(labels):
            for r in rows:
                if (r["library"], r["backend"]) == (lib, backend) and label == (
                    f"{r['m']}x{r['N']} r{r['rank']} {r['fraction']:.0%}"
                ):
                    xs.append(j + k * width)
                    ys.append(r["time_s"])
        ax.bar(xs, ys, width=width, label=f"{lib} / {backend}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"time to tol {TOL:g} (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
