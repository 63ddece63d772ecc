"""Where one solver iteration's time goes, at the headline size (n=32, p=256, q=16, float64).

The floor fraction of ``solver_scaling.py`` compares a whole solve with
iterations x one factorisation. This script splits one iteration instead, each
part timed inside a ``lax.fori_loop`` (so dispatch is not counted) as the
difference between ``K`` and 1 trips, divided by ``K - 1``:

* the rank-capped singular value thresholding (the factorisation the floor counts);
* a whole ADMM iteration (``ADMM`` through ``loop.iterate`` with ``tol=0``, ``K`` vs 1 iterations);
* one elementwise pass over a ``(n, p, q)`` iterate (1 MiB in float64);
* one sum of squares over the same iterate (a reduction, as the block norms and
  the residuals of the stopping test need), in float64 and float32.

Usage::

    OPENBLAS_NUM_THREADS=1 python benchmarks/iteration_profile.py [--trips 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from _environment import environment  # noqa: E402
from solver_scaling import per_trip as loop_trip  # noqa: E402
from solver_scaling import timed  # noqa: E402

from clair_jax._src.linalg import prox, svt_capped  # noqa: E402
from clair_jax._src.linalg import svt as svd_lib  # noqa: E402
from clair_jax._src.solvers import admm, loop, problem  # noqa: E402

HERE = Path(__file__).resolve().parent
N, P, Q, CAP = 32, 256, 16, 16


def median_time(fn, arg, repeats: int = 20) -> float:
    """Median seconds of ``fn(arg)`` after a warm-up call (``solver_scaling.timed``)."""
    return timed(lambda: fn(arg), repeats)[0]


def per_trip(body, init, trips: int) -> float:
    """Seconds per trip of ``body`` in a ``fori_loop`` (``solver_scaling.per_trip``)."""
    return loop_trip(body, init, trips, repeats=20)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=40)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "iteration_profile.json")
    args = parser.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (N, P, Q), jnp.float64)
    matrix = prox.blocks_to_matrix(x)
    basis = svt_capped.initial_basis(matrix.shape, CAP, x.dtype)
    tau = 0.1 * float(jnp.linalg.norm(matrix, 2))

    def threshold(c):
        m, b = c
        out, _, b = svd_lib.svt(m, tau, backend="rank_capped", basis=b)
        return m + 1e-3 * out, b

    options = problem.Options(
        constrained=False, offset=False, tol=0.0, max_iter=1,
        backend="rank_capped", rank_cap=CAP, power_iters=1,
    )  # fmt: skip
    data = problem.Data(x, jnp.asarray(tau), jnp.asarray(0.05 * tau), jnp.ones(N))
    zeros = jnp.zeros_like(x)

    def admm_time(iters):
        opts = options._replace(max_iter=iters)
        solver = admm.ADMM()

        def run(u):
            d = data._replace(updates=u)
            return loop.iterate(solver, d, opts, solver.init(d, opts, zeros, zeros, basis),
                                unrolled=False)  # fmt: skip

        solve = jax.jit(run)
        return median_time(solve, x)

    rows = {
        "rank_capped_threshold_ms": per_trip(threshold, (matrix, basis), args.trips),
        "admm_iteration_ms": (admm_time(args.trips) - admm_time(1)) / (args.trips - 1),
        "elementwise_pass_f64_ms": per_trip(lambda c: c * 1.0001, x, args.trips),
        "sum_of_squares_f64_ms": per_trip(
            lambda c: (c[0] * 1.0001, c[1] + jnp.sum(c[0] * c[0])), (x, 0.0), args.trips
        ),
        "sum_of_squares_f32_ms": per_trip(
            lambda c: (c[0] * 1.0001, c[1] + jnp.sum(c[0] * c[0])),
            (x.astype(jnp.float32), jnp.float32(0.0)),
            args.trips,
        ),
    }
    rows = {k: 1e3 * v for k, v in rows.items()}
    # The reductions include one elementwise pass (which keeps them inside the loop).
    for kind in ("f64", "f32"):
        rows[f"sum_of_squares_{kind}_ms"] -= rows["elementwise_pass_f64_ms"]
    result = {"n": N, "p": P, "q": Q, "rank_cap": CAP, "trips": args.trips, **rows}
    result["environment"] = environment()
    for k, v in rows.items():
        print(f"{k:32s} {v:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
