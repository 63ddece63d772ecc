"""CLAIR simulations: does our reconstruction live up to the abstract's claims?

``python benchmarks/clair_simulations.py [--quick]`` runs six experiments on the
synthetic federations of :mod:`clair_jax.simulate` and writes
``benchmarks/out/clair_simulations.json`` (every number),
``benchmarks/out/clair_results.md`` (tables) and ``clair_*.png`` (plots):

1. **phase**: noiseless updates; exact recovery (rank, subspace to 1e-3 in
   float32, contaminated set exactly) over contaminated fraction x rank.
2. **noise**: noisy updates; subspace error against the noise level (stable
   recovery: linear growth) and detection.
3. **samples**: regression clients; detection and errors as the samples per
   client grow (consistency).
4. **refinement**: per-client error of CLAIR against local least squares, plain
   averaging and robust averages (coordinate median, trimmed mean, geometric
   median) over contaminated fraction x heterogeneity, and against client
   homogeneity (spread of the client-specific coefficients).
5. **clients**: CLAIR / local error ratio over number of clients x samples per client.
6. **target**: the issue's target (n=40, p=64, q=16, r=3, 30% contaminated,
   2x more samples than features) over 20 seeds, for every contamination kind.

Every trial is a pure function of a ``jax.random`` key; trials are batched over
seeds with ``jax.vmap`` (the library's own ``jit`` caches are reused across
calls, so only new shapes compile). Detection metrics (precision, recall, F1 of
the flagged set) are reported everywhere. The robust baselines are written here,
independently of the library's aggregators.
"""

from __future__ import annotations

import os

# XLA's CPU SVD calls OpenBLAS, whose threads spin against XLA's own on a small
# machine (100x slower SVDs measured on 2 shared cores): one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import clair_jax as cj  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "out"
METHODS = ("clair", "local", "mean", "coord_median", "trimmed_mean", "geo_median")
TARGET = {"n": 40, "p": 64, "q": 16, "rank": 3, "samples": 128, "fraction": 0.3}
DETECTABLE = ("dense", "scaled", "label_noise")


# --- baselines (global aggregates: every client receives the same estimate) ---------------


def coordinate_median(x):
    return jnp.median(x, axis=0)


def trimmed_mean(x, beta=0.2):
    """Coordinate-wise mean after dropping the ``floor(beta n)`` largest and smallest values."""
    n = x.shape[0]
    k = int(np.floor(beta * n))
    s = jnp.sort(x, axis=0)
    return jnp.mean(s[k : n - k], axis=0)


def geometric_median(x, iters=200, eps=1e-8):
    """Smoothed Weiszfeld iterations (Pillutla et al. 2019), started at the coordinate median."""
    scale = jnp.sqrt(jnp.mean(x**2)) * np.sqrt(x[0].size)

    def step(_, z):
        dist = jnp.linalg.norm((x - z[None]).reshape(x.shape[0], -1), axis=1)
        w = 1.0 / jnp.maximum(dist, eps * scale)
        return jnp.einsum("n,npq->pq", w, x) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, step, coordinate_median(x))


def _benign_mean(values, benign):
    w = benign.astype(values.dtype)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def _errors(x, refined, theta, benign):
    """Mean Frobenius error over benign clients for every method."""

    def err(est):
        est = jnp.broadcast_to(est, theta.shape)
        return _benign_mean(jnp.linalg.norm(est - theta, axis=(1, 2)), benign)

    return {
        "clair": err(refined),
        "local": err(x),
        "mean": err(jnp.mean(x, axis=0)),
        "coord_median": err(coordinate_median(x)),
        "trimmed_mean": err(trimmed_mean(x)),
        "geo_median": err(geometric_median(x)),
    }


def _detection(res, contaminated, kind):
    met = cj.detection_metrics(~res.collaborative, contaminated)
    flagged = ~res.collaborative
    # Recall per contamination kind (NaN where the kind is absent).
    per_kind = {}
    for code, name in enumerate(cj.simulate.KIND_NAMES):
        if code == 0:
            continue
        mask = kind == code
        per_kind[name] = jnp.where(
            jnp.any(mask), jnp.sum(flagged & mask) / jnp.maximum(jnp.sum(mask), 1), jnp.nan
        )
    # What the decomposition alone flags (non-zero blocks of Ŝ), for comparison.
    sparse = cj.detection_metrics(res.block_norms > 0, contaminated)
    return {
        "precision": met.precision,
        "recall": met.recall,
        "f1": met.f1,
        "f1_sparse_support": sparse.f1,
        "recall_by_kind": per_kind,
    }


# --- trials ------------------------------------------------------------------------------


def regression_trial(key, *, n, p, q, rank, samples, fraction, kind, noise=1.0,
                     heterogeneity=0.0, spread=1.0, offset=False, refit=True):  # fmt: skip
    data = cj.simulate.linear_regression(
        key, n=n, p=p, q=q, rank=rank, samples=samples, fraction=fraction, kind=kind,
        noise=noise, heterogeneity=heterogeneity, spread=spread,
    )  # fmt: skip
    est = cj.simulate.least_squares(data.features, data.responses)
    # offset=False: the server knows the base W_0 and sees updates Θ̂_i - W_0.
    x = est if offset else est - data.offset[None]
    theta = data.parameters if offset else data.parameters - data.offset[None]
    res = cj.clair(x, offset=offset, refit=refit)
    benign = ~data.contaminated
    errors = _errors(x, res.refined, theta, benign)
    return {
        "errors": errors,
        "ratio_local": errors["clair"] / errors["local"],
        "detection": _detection(res, data.contaminated, data.kind),
        "subspace": cj.subspace_distance(data.basis, res.basis),
        "rank": res.rank,
        "noise_ratio": res.noise_scale * np.sqrt(max(samples - p - 1, 1)) / noise,
    }


def updates_trial(key, noise, *, n, p, q, rank, fraction, kind="dense", noise_scale=None,
                  refit=True):  # fmt: skip
    fed = cj.simulate.shared_subspace_updates(
        key, n=n, p=p, q=q, rank=rank, fraction=fraction, kind=kind, noise=noise
    )
    res = cj.clair(fed.updates, noise_scale=noise_scale, refit=refit)
    exact_set = jnp.all(res.collaborative == ~fed.contaminated)
    subspace = cj.subspace_distance(fed.basis, res.basis)
    return {
        "subspace": subspace,
        "rank_ok": res.rank == rank,
        "exact_set": exact_set,
        "detection": _detection(res, fed.contaminated, fed.kind),
        "noise_ratio": res.noise_scale / jnp.maximum(noise, 1e-30),
    }


def _keys(start, count):
    return jax.vmap(jax.random.key)(jnp.arange(start, start + count))


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _summ(values):
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


# --- experiments -------------------------------------------------------------------------


def _detection_panel(ax, x, rows, xlabel: str, title: str) -> None:
    """Mean precision, recall and F1 of ``rows`` against ``x`` (log scale) on ``ax``."""
    for key in ("precision", "recall", "f1"):
        ax.semilogx(x, [r[key]["mean"] for r in rows], "o-", label=key)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.legend()


def _save(fig, name: str) -> None:
    """Lays out ``fig``, writes it to ``RESULTS / name`` and closes it."""
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=120)
    plt.close(fig)


def phase_transition(cfg, log):
    """Noiseless exact recovery, with σ estimated (defaults) and with σ = 0 given."""
    n, p, q = 40, 32, 4
    ranks, fractions, seeds = cfg["phase_ranks"], cfg["phase_fractions"], cfg["phase_seeds"]
    variants = {"estimated": None, "known": 0.0}
    success = {v: np.zeros((len(ranks), len(fractions))) for v in variants}
    cells = []
    for variant, noise_scale in variants.items():
        for i, rank in enumerate(ranks):
            for j, fraction in enumerate(fractions):
                run = jax.vmap(partial(updates_trial, noise=0.0, n=n, p=p, q=q, rank=rank,
                                       fraction=fraction, noise_scale=noise_scale))  # fmt: skip
                out = _np(run(_keys(10_000 + 100 * i + j, seeds)))
                ok = (out["subspace"] < 1e-3) & (out["rank_ok"] > 0) & (out["exact_set"] > 0)
                success[variant][i, j] = ok.mean()
                cells.append({
                    "noise_scale": variant, "rank": rank, "fraction": fraction,
                    "success": float(ok.mean()), "subspace_max": float(out["subspace"].max()),
                    "f1": _summ(out["detection"]["f1"]),
                })  # fmt: skip
            log(
                f"phase (σ {variant}) rank {rank}: "
                + " ".join(f"{s:.2f}" for s in success[variant][i])
            )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, variant in zip(axes, variants, strict=True):
        im = ax.imshow(
            success[variant], origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto"
        )
        ax.set_xticks(range(len(fractions)), [f"{f:.0%}" for f in fractions])
        ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_xlabel("contaminated fraction")
        ax.set_ylabel("rank r of the shared subspace")
        label = "defaults (σ estimated)" if variant == "estimated" else "noise_scale=0 given"
        ax.set_title(f"{label}", fontsize=10)
    fig.suptitle(f"Exact recovery, noiseless, dense contamination (n={n}, p={p}, q={q}, "
                 f"{seeds} seeds)")  # fmt: skip
    fig.colorbar(im, ax=axes, label="success rate")
    fig.savefig(RESULTS / "clair_phase_transition.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return {"n": n, "p": p, "q": q, "seeds": seeds, "ranks": ranks, "fractions": fractions,
            "success": {v: success[v].tolist() for v in variants}, "cells": cells}  # fmt: skip


def noise_stability(cfg, log):
    size = {"n": 40, "p": 64, "q": 16, "rank": 3, "fraction": 0.3}
    noises, seeds = cfg["noise_levels"], cfg["noise_seeds"]
    rows = []
    for i, noise in enumerate(noises):
        keys = _keys(20_000 + 100 * i, seeds)
        out = _np(jax.vmap(partial(updates_trial, **size))(keys, jnp.full((seeds,), noise)))
        rows.append({
            "noise": noise, "subspace": _summ(out["subspace"]),
            "subspace_over_noise": _summ(out["subspace"] / noise),
            "rank_ok": float(out["rank_ok"].mean()), "f1": _summ(out["detection"]["f1"]),
            "precision": _summ(out["detection"]["precision"]),
            "recall": _summ(out["detection"]["recall"]),
            "noise_ratio": _summ(out["noise_ratio"]),
        })  # fmt: skip
        log(
            f"noise {noise:.0e}: subspace {rows[-1]['subspace']['mean']:.2e} "
            f"(/noise {rows[-1]['subspace_over_noise']['mean']:.2f}), "
            f"F1 {rows[-1]['f1']['mean']:.3f}"
        )
    sub = np.array([r["subspace"]["mean"] for r in rows])
    slope = float(np.polyfit(np.log(noises), np.log(sub), 1)[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].loglog(noises, sub, "o-", label="CLAIR subspace error")
    axes[0].loglog(noises, sub[0] * np.asarray(noises) / noises[0], "k--", label="slope 1")
    axes[0].set_xlabel("noise std per entry")
    axes[0].set_ylabel(r"$\|P_U - P_{\hat U}\|_F$ (mean)")
    axes[0].set_title(f"Stable recovery (fitted slope {slope:.2f})")
    axes[0].legend()
    _detection_panel(
        axes[1], noises, rows, "noise std per entry", "Detection (30% dense contamination)"
    )
    _save(fig, "clair_noise_stability.png")
    return {**size, "seeds": seeds, "slope": slope, "rows": rows}


def samples_consistency(cfg, log):
    size = {k: v for k, v in TARGET.items() if k != "samples"}
    rows = []
    for i, samples in enumerate(cfg["samples"]):
        run = jax.vmap(partial(regression_trial, **size, samples=samples, kind=DETECTABLE))
        out = _np(run(_keys(30_000 + 100 * i, cfg["seeds"])))
        det = out["detection"]
        rows.append({
            "samples": samples, "f1": _summ(det["f1"]), "precision": _summ(det["precision"]),
            "recall": _summ(det["recall"]), "subspace": _summ(out["subspace"]),
            "ratio_local": _summ(out["ratio_local"]), "rank_ok": float((out["rank"] == 3).mean()),
        })  # fmt: skip
        log(
            f"samples {samples}: F1 {rows[-1]['f1']['mean']:.3f}, "
            f"subspace {rows[-1]['subspace']['mean']:.3f}, "
            f"CLAIR/local {rows[-1]['ratio_local']['mean']:.3f}"
        )
    ms = [r["samples"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _detection_panel(
        axes[0],
        ms,
        rows,
        "samples per client m (p = 64 features)",
        "Detection (30%: dense, scaled, label noise)",
    )
    axes[1].loglog(ms, [r["subspace"]["mean"] for r in rows], "o-", label="subspace error")
    axes[1].loglog(ms, [r["ratio_local"]["mean"] for r in rows], "s-", label="CLAIR / local")
    axes[1].set_xlabel("samples per client m")
    axes[1].legend()
    _save(fig, "clair_samples.png")
    return {**size, "seeds": cfg["seeds"], "kind": list(DETECTABLE), "rows": rows}


def refinement(cfg, log):
    size = {k: v for k, v in TARGET.items() if k != "fraction"}
    grid = []
    settings = [("heterogeneity", h, 1.0) for h in cfg["heterogeneity"]]
    settings += [("spread", 0.0, s) for s in cfg["spread"] if s != 1.0]
    for g, (axis, het, spread) in enumerate(settings):
        for j, fraction in enumerate(cfg["fractions"]):
            run = jax.vmap(partial(regression_trial, **size, fraction=fraction, kind="dense",
                                   heterogeneity=het, spread=spread))  # fmt: skip
            out = _np(run(_keys(40_000 + 100 * g + j, cfg["seeds"])))
            cell = {"axis": axis, "heterogeneity": het, "spread": spread, "fraction": fraction,
                    "errors": {m: float(out["errors"][m].mean()) for m in METHODS},
                    "f1": _summ(out["detection"]["f1"]),
                    "precision": _summ(out["detection"]["precision"]),
                    "recall": _summ(out["detection"]["recall"])}  # fmt: skip
            best_other = min(cell["errors"][m] for m in METHODS if m not in ("clair", "local"))
            cell["beats_local"] = cell["errors"]["clair"] < cell["errors"]["local"]
            cell["beats_aggregators"] = cell["errors"]["clair"] < best_other
            grid.append(cell)
        log(
            f"refinement {axis} het={het} spread={spread}: CLAIR/local "
            + " ".join(
                f"{c['errors']['clair'] / c['errors']['local']:.2f}"
                for c in grid[-len(cfg["fractions"]) :]
            )
        )
    cols = (len(settings) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 7.5), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(settings) :]:
        ax.axis("off")
    for ax, (_, het, spread) in zip(axes, settings, strict=False):
        cells = [c for c in grid if c["heterogeneity"] == het and c["spread"] == spread]
        fr = [c["fraction"] for c in cells]
        for m in METHODS:
            ax.semilogy(fr, [c["errors"][m] for c in cells], "o-", label=m)
        ax.set_title(f"heterogeneity {het}, spread {spread}")
        ax.set_xlabel("contaminated fraction")
    axes[0].set_ylabel("mean benign-client error (Frobenius)")
    axes[0].legend(fontsize=8)
    _save(fig, "clair_refinement.png")
    return {**size, "seeds": cfg["seeds"], "kind": "dense", "grid": grid}


def clients_samples(cfg, log):
    p, q, rank, fraction, het = 64, 16, 3, 0.2, cfg["client_heterogeneity"]
    clients, samples = cfg["clients"], cfg["client_samples"]
    ratio = np.zeros((len(clients), len(samples)))
    cells = []
    for i, n in enumerate(clients):
        for j, m in enumerate(samples):
            run = jax.vmap(partial(regression_trial, n=n, p=p, q=q, rank=rank, samples=m,
                                   fraction=fraction, kind="dense", heterogeneity=het))  # fmt: skip
            out = _np(run(_keys(50_000 + 100 * i + j, cfg["seeds"])))
            ratio[i, j] = out["errors"]["clair"].mean() / out["errors"]["local"].mean()
            cells.append({"n": n, "samples": m, "ratio_local": float(ratio[i, j]),
                          "f1": _summ(out["detection"]["f1"])})  # fmt: skip
        log(f"clients n={n}: CLAIR/local " + " ".join(f"{r:.2f}" for r in ratio[i]))
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(ratio, origin="lower", cmap="RdYlGn_r", vmin=0, vmax=2, aspect="auto")
    for i in range(len(clients)):
        for j in range(len(samples)):
            ax.text(j, i, f"{ratio[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(samples)), [str(m) for m in samples])
    ax.set_yticks(range(len(clients)), [str(n) for n in clients])
    ax.set_xlabel("samples per client m (p = 64 features)")
    ax.set_ylabel("clients n")
    ax.set_title(f"CLAIR / local error (20% dense, heterogeneity {het})")
    fig.colorbar(im)
    _save(fig, "clair_clients_samples.png")
    return {"p": p, "q": q, "rank": rank, "fraction": fraction, "heterogeneity": het,
            "seeds": cfg["seeds"],
            "clients": clients, "samples": samples, "ratio": ratio.tolist(),
            "cells": cells}  # fmt: skip


def target(cfg, log):
    kinds = [("dense",), DETECTABLE, ("scaled",), ("label_noise",), ("subspace",),
             ("sign_flip",)]  # fmt: skip
    variants = [(kind, False, True) for kind in kinds]
    variants.insert(2, (DETECTABLE, True, True))  # unknown offset W_0
    variants.insert(1, (("dense",), False, False))  # no refit: basis of the decomposition
    rows = []
    for kind, offset, refit in variants:
        run = jax.vmap(partial(regression_trial, **TARGET, kind=kind, offset=offset, refit=refit))
        start = time.perf_counter()
        out = _np(run(_keys(1000, cfg["target_seeds"])))
        elapsed = time.perf_counter() - start
        det = out["detection"]
        errors = {m: float(out["errors"][m].mean()) for m in METHODS}
        row = {
            "kind": "+".join(kind), "offset": offset, "refit": refit,
            "seeds": cfg["target_seeds"],
            "f1": _summ(det["f1"]), "precision": _summ(det["precision"]),
            "recall": _summ(det["recall"]),
            "f1_sparse_support": _summ(det["f1_sparse_support"]),
            "ratio_local": errors["clair"] / errors["local"],
            "ratio_local_per_seed": _summ(out["ratio_local"]), "errors": errors,
            "subspace": _summ(out["subspace"]), "rank": _summ(out["rank"]),
            "noise_ratio": _summ(out["noise_ratio"]), "seconds": elapsed,
            "recall_by_kind": {k: _summ(v) for k, v in det["recall_by_kind"].items()
                               if _summ(v) is not None},
        }  # fmt: skip
        rows.append(row)
        log(
            f"target {row['kind']} offset={offset} refit={refit}: F1 {row['f1']['mean']:.3f} "
            f"(min {row['f1']['min']:.3f}), CLAIR/local {row['ratio_local']:.3f}, "
            f"rank {row['rank']['mean']:.1f}"
        )
    return {**TARGET, "rows": rows}


# --- report ------------------------------------------------------------------------------


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results) -> str:
    out = ["# CLAIR simulations", ""]
    meta = results["meta"]
    out.append(
        f"`python benchmarks/clair_simulations.py{' --quick' if meta['quick'] else ''}`, "
        f"{meta['wall_seconds']:.0f} s on {meta['machine']} (jax {meta['jax']}, float32)."
    )
    t = results["target"]
    out += ["", "## Target: n=40, p=64, q=16, r=3, 30% contaminated, m=128 samples (2p)", ""]
    out.append(
        "| contamination | W_0 | refit | F1 mean (min) | precision | recall | F1 of Ŝ support "
        "| CLAIR/local error | rank | subspace err |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in t["rows"]:
        out.append(
            f"| {r['kind']} | {'unknown' if r['offset'] else 'known'} | "
            f"{'yes' if r['refit'] else 'no'} | "
            f"{_fmt(r['f1']['mean'])} ({_fmt(r['f1']['min'])}) | {_fmt(r['precision']['mean'])} "
            f"| {_fmt(r['recall']['mean'])} | {_fmt(r['f1_sparse_support']['mean'])} | "
            f"{_fmt(r['ratio_local'])} | {_fmt(r['rank']['mean'], 1)} | "
            f"{_fmt(r['subspace']['mean'])} |"
        )
    out += ["", "Errors of every method at the target (mean benign-client Frobenius error):", ""]
    out.append("| contamination | W_0 | refit | " + " | ".join(METHODS) + " |")
    out.append("|---|---|---|" + "---|" * len(METHODS))
    for r in t["rows"]:
        out.append(
            f"| {r['kind']} | {'unknown' if r['offset'] else 'known'} | "
            f"{'yes' if r['refit'] else 'no'} | "
            + " | ".join(_fmt(r["errors"][m]) for m in METHODS)
            + " |"
        )
    ph = results["phase"]
    out += ["", f"## Noiseless exact recovery (n={ph['n']}, p={ph['p']}, q={ph['q']}, "
            f"{ph['seeds']} seeds; success = rank, subspace to 1e-3 and contaminated set exact)",
            ""]  # fmt: skip
    for variant, label in (("estimated", "defaults (σ estimated)"), ("known", "σ = 0 given")):
        out += [f"{label}:", ""]
        out.append("| rank \\ fraction | " + " | ".join(f"{f:.0%}" for f in ph["fractions"]) + " |")
        out.append("|---|" + "---|" * len(ph["fractions"]))
        for rank, row in zip(ph["ranks"], ph["success"][variant], strict=True):
            out.append(f"| {rank} | " + " | ".join(f"{s:.2f}" for s in row) + " |")
        out.append("")
    ns = results["noise"]
    out += ["", f"## Stable recovery (n=40, p=64, q=16, r=3, 30% dense; fitted log-log slope "
            f"{ns['slope']:.2f})", "", "| noise | subspace err | err / noise | F1 | rank ok |",
            "|---|---|---|---|---|"]  # fmt: skip
    for r in ns["rows"]:
        out.append(
            f"| {r['noise']:.0e} | {r['subspace']['mean']:.2e} | "
            f"{r['subspace_over_noise']['mean']:.2f} | {_fmt(r['f1']['mean'])} | "
            f"{r['rank_ok']:.2f} |"
        )
    sm = results["samples"]
    out += ["", "## Consistency in the samples per client (30% dense/scaled/label noise)", "",
            "| m | F1 | precision | recall | subspace err | CLAIR/local |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sm["rows"]:
        out.append(
            f"| {r['samples']} | {_fmt(r['f1']['mean'])} | {_fmt(r['precision']['mean'])} | "
            f"{_fmt(r['recall']['mean'])} | {_fmt(r['subspace']['mean'])} | "
            f"{_fmt(r['ratio_local']['mean'])} |"
        )
    rf = results["refinement"]
    out += ["", "## Refinement (dense contamination; errors are mean benign-client Frobenius "
            "errors)", "", "| heterogeneity | spread | fraction | F1 | " + " | ".join(METHODS)
            + " | CLAIR best? |", "|---|---|---|---|" + "---|" * len(METHODS) + "---|"]  # fmt: skip
    for c in rf["grid"]:
        best = min(METHODS, key=lambda m, c=c: c["errors"][m])
        out.append(
            f"| {c['heterogeneity']} | {c['spread']} | {c['fraction']:.0%} | "
            f"{_fmt(c['f1']['mean'])} | "
            + " | ".join(_fmt(c["errors"][m]) for m in METHODS)
            + f" | {'yes' if best == 'clair' else 'no: ' + best} |"
        )
    losses = [c for c in rf["grid"] if not (c["beats_local"] and c["beats_aggregators"])]
    out += ["", f"CLAIR is not the best method in {len(losses)} of {len(rf['grid'])} cells."]
    cs = results["clients"]
    out += [
        "",
        f"## CLAIR / local error over clients x samples per client (20% dense, "
        f"heterogeneity {cs['heterogeneity']}, {cs['seeds']} seeds)",
        "",
        "| n \\ m | " + " | ".join(map(str, cs["samples"])) + " |",
        "|---|" + "---|" * len(cs["samples"]),
    ]
    for n, row in zip(cs["clients"], cs["ratio"], strict=True):
        out.append(f"| {n} | " + " | ".join(f"{r:.2f}" for r in row) + " |")
    return "\n".join(out) + "\n"


CONFIGS = {
    "quick": {
        "phase_ranks": [2, 4, 6, 8, 12],
        "phase_fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        "phase_seeds": 3,
        "noise_levels": [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1],
        "noise_seeds": 4,
        "samples": [72, 96, 128, 256, 512],
        "seeds": 4,
        "heterogeneity": [0.0, 0.05, 0.1, 0.2],
        "spread": [0.02, 0.1, 1.0],
        "fractions": [0.0, 0.15, 0.3, 0.45],
        "clients": [5, 10, 40],
        "client_samples": [80, 512, 2048],
        "client_heterogeneity": 0.02,
        "target_seeds": 20,
    },
    "full": {
        "phase_ranks": [1, 2, 3, 4, 6, 8, 10, 12, 16],
        "phase_fractions": [0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6],
        "phase_seeds": 10,
        "noise_levels": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 2e-1, 3e-1],
        "noise_seeds": 10,
        "samples": [72, 80, 96, 128, 192, 256, 512, 1024],
        "seeds": 10,
        "heterogeneity": [0.0, 0.025, 0.05, 0.1, 0.2],
        "spread": [0.02, 0.05, 0.1, 1.0],
        "fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.45],
        "clients": [5, 10, 20, 40, 80],
        "client_samples": [72, 96, 128, 256, 512, 1024, 2048],
        "client_heterogeneity": 0.02,
        "target_seeds": 20,
    },
}


def main(argv=None) -> None:
    global RESULTS  # --out: the plotting functions write there
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids (< 5 min on 2 cores)")
    parser.add_argument(
        "--only", nargs="*", default=None,
        choices=["target", "phase", "noise", "samples", "refinement", "clients"],
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    RESULTS = results_dir = args.out
    cfg = CONFIGS["quick" if args.quick else "full"]
    results_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    experiments = {
        "target": target, "phase": phase_transition, "noise": noise_stability,
        "samples": samples_consistency, "refinement": refinement, "clients": clients_samples,
    }  # fmt: skip
    results = {}
    for name, fn in experiments.items():
        if args.only is None or name in args.only:
            results[name] = fn(cfg, log)
    wall = time.perf_counter() - start
    results["meta"] = {
        "quick": args.quick, "config": cfg, "wall_seconds": wall, "jax": jax.__version__,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU ({jax.default_backend()})",
    }  # fmt: skip
    suffix = "" if args.only is None else "_partial"
    with open(results_dir / f"clair_simulations{suffix}.json", "w") as f:
        json.dump(results, f, indent=1)
    if args.only is None:
        (results_dir / "clair_results.md").write_text(markdown(results))
    log(f"done in {wall:.0f} s; results in {results_dir}")


if __name__ == "__main__":
    main()
