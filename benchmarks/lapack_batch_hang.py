"""Does jaxlib's CPU batched-LAPACK deadlock still exist? Tries it in subprocesses.

jaxlib 0.10's CPU LAPACK kernels split a batched call into chunks on XLA's
intra-op pool and wait for them; two independent batched calls running at once
on a pool of two threads can leave both threads waiting (0% CPU, forever).
``clair_jax._src.batching`` works around it by factorising one matrix at a time
on CPU. This script checks whether the installed jaxlib still hangs: each try
is a fresh Python process (``OPENBLAS_NUM_THREADS=1`` unless told otherwise),
pinned to ``--cpus`` cores (XLA sizes its pool from them), that runs
``--trips`` iterations of a jitted ``lax.fori_loop`` whose body holds two
independent chains of three batched factorisations (16 problems each,
float64; QR of 256 x 16, eigh or Cholesky of 64 x 64). A try still running after
``--timeout`` seconds is killed and counted as a hang if it used no CPU in its
last seconds (a deadlock waits at 0% CPU), else as too slow.

The deadlock needs both pool threads inside a batched call at once, so it is
hit less often when other processes share the cores: on a busy machine run
the tries with a higher priority (``--nice -15``, as root).

Run: ``python benchmarks/lapack_batch_hang.py [--tries 5] [--ops qr eigh cholesky] [--nice -15]``.
Prints one line per try and a summary per operation; exit status 1 if any try hung.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = r"""
import sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp

op, trips = sys.argv[1], int(sys.argv[2])
key_a, key_b, key_basis = jax.random.split(jax.random.key(0), 3)
t = lambda m: jnp.swapaxes(m, -1, -2)
basis = jnp.linalg.qr(jax.random.normal(key_basis, (256, 16)))[0]
eye = jnp.eye(64)

# Batches of 16 problems of 64 x 256, as a vmapped rank-capped SVT sees them.
if op == "qr":  # (16, 256, 16) QRs, as in its power iteration
    factor = lambda x: jnp.linalg.qr(t(x) @ (x @ basis))[0]
    update = lambda x, f: x + 1e-3 * (x @ f) @ t(f)
elif op == "eigh":  # (16, 64, 64), as the Gram backend
    factor = lambda x: jnp.linalg.eigh(x @ t(x) / 256 + eye)[1]
    update = lambda x, f: x + 1e-3 * f @ (t(f) @ x)
else:  # cholesky (16, 64, 64)
    factor = lambda x: jnp.linalg.cholesky(x @ t(x) / 256 + eye)
    update = lambda x, f: x + 1e-3 * f @ x / 64


def branch(x):
    for _ in range(3):  # a chain of factorisations, as in a power iteration
        x = update(x, factor(x))
    return x


@jax.jit
def run(a, b):
    def body(i, carry):
        a, b = carry
        return branch(a), branch(b)  # two independent batched factorisations

    return jax.lax.fori_loop(0, trips, body, (a, b))


out = jax.block_until_ready(run(jax.random.normal(key_a, (16, 64, 256)),
                               jax.random.normal(key_b, (16, 64, 256))))
print("ok", jax.__version__, jax.lib.__version__ if hasattr(jax.lib, "__version__") else "")
"""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def one_try(
    op: str, trips: int, cpus: int, timeout: float, env: dict, niceness: int = 0
) -> tuple[str, float, str]:
    """Runs one child; returns (outcome, wall seconds, CPU use if it was killed)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def pin():
        if available:
            os.sched_setaffinity(0, available[:cpus])
        if niceness:
            os.nice(niceness)

    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, op, str(trips)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=pin,
        env=env,
    )
    window = min(10.0, timeout / 2)
    try:
        out, _ = proc.communicate(timeout=timeout - window)
    except subprocess.TimeoutExpired:
        before = cpu_seconds(proc.pid)
        try:
            out, _ = proc.communicate(timeout=window)
        except subprocess.TimeoutExpired:
            after = cpu_seconds(proc.pid)
            proc.kill()
            proc.communicate()
            wall = time.perf_counter() - start
            if before is None or after is None:
                return "timeout", wall, ""
            # a deadlock uses no CPU; a slow run keeps computing
            outcome = "hang" if after - before < 0.1 * window else "slow"
            used = f", {after:.1f} s CPU, {after - before:.1f} s in its last {window:.0f} s"
            return outcome, wall, used
    wall = time.perf_counter() - start
    if proc.returncode != 0 or "ok" not in out:
        errors = [line for line in out.splitlines() if "Error" in line] or out.splitlines()[-1:]
        return f"error (rc={proc.returncode}): {errors[-1:]}", wall, ""
    return "ok", wall, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--ops", nargs="+", default=["qr", "eigh", "cholesky"])
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--trips", type=int, default=200, help="fori_loop iterations per try")
    parser.add_argument("--cpus", type=int, default=2, help="cores each try is pinned to")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a hang")
    parser.add_argument(
        "--openblas-threads",
        default="1",
        help="OPENBLAS_NUM_THREADS for the tries ('inherit': this process's environment); "
        "1 keeps OpenBLAS's own pool out of the way, as clair_jax does",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness added to the tries; on a busy machine the deadlock is rarely hit "
        "(its two threads seldom run at once), and a negative value (root) emulates an "
        "idle one",
    )
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.openblas_threads != "inherit":
        env["OPENBLAS_NUM_THREADS"] = args.openblas_threads

    import jax
    import jaxlib

    print(
        f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"{args.cpus} cpus, OPENBLAS_NUM_THREADS={env.get('OPENBLAS_NUM_THREADS')}, "
        f"{args.trips} trips, timeout {args.timeout:.0f} s, nice {args.nice:+d}, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    any_hang = False
    for op in args.ops:
        hangs = slow = 0
        for i in range(args.tries):
            outcome, wall, extra = one_try(op, args.trips, args.cpus, args.timeout, env, args.nice)
            hangs += outcome == "hang"
            slow += outcome in ("slow", "timeout")
            print(f"{op} try {i + 1}: {outcome} after {wall:.1f} s{extra}", flush=True)
        print(f"{op}: {hangs}/{args.tries} hung, {slow} too slow (still computing)", flush=True)
        any_hang |= hangs > 0
    return 1 if any_hang else 0


if __name__ == "__main__":
    sys.exit(main())
