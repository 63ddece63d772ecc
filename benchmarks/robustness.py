"""Robustness of every aggregation rule: attack kind x attacker fraction on synthetic LoRA factors.

One module, ``n`` clients, LoRA rank ``r``. The round starts from the global adapter
``(B_0, 0)`` with ``B_0 = U M`` (``U`` a random ``p x r`` orthonormal basis, ``M``
standard normal): ``B`` is the random down-projection, ``A`` the zero-initialised
factor, as in this package's model. Benign client ``i`` returns

    B_i = U (M + h N_i) + ν E_i,     A_i = A* + h sqrt(r/q) N'_i,

(``N_i, N'_i, E_i`` standard normal, ``h`` the heterogeneity, ``ν`` 1% of ``M``'s
root-mean-square entry), so the updates ``X_i = B_i A_i`` share the column space
``U``. A fraction of the clients (``round(f n)``, at random positions) attack:

* ``random``: Gaussian factors of the benign factors' size, no shared structure;
* ``scaled``: ``start + 5 (trained - start)`` factor by factor (the attack model of
  ``clair_jax._src.federated.attacks``);
* ``sign_flip``: ``start - (trained - start)``;
* ``coordinated_flip``: all attackers send ``start - 3 mean_group (trained - start)``,
  about ``-3x`` the benign update: inside the shared subspace, with the benign
  clients' noise level;
* ``own_subspace``: a coordinated group in its own random column space ``U'``
  (``B = U' M + ν E_i``, benign ``A``);
* ``nan``: ``B`` full of NaN;
* ``huge``: ``B`` scaled to a largest entry of ``1e20`` (finite in float32).

Every rule of ``clair_jax`` aggregates the round (CLAIR as ``cj.clair_aggregator()``,
its defaults). Reported per cell (rule, kind, fraction), averaged over seeds:

* the relative error ``||B_g A_g - X̄_benign||_F / ||X̄_benign||_F`` of the global
  update against the benign clients' mean update (``inf`` when the global adapter
  is not finite);
* the F1 score of the flagged set against the attackers (rules that flag);
* ``refused`` when the rule raises (Krum's ``n >= 2f + 3``; NaN and huge clients are screened out).

Krum and Multi-Krum are told the true number of attackers ``f`` (Multi-Krum averages
``n - f``); the trimmed mean trims ``β = 0.1``.

Usage::

    python benchmarks/robustness.py            # 3 seeds (several minutes on 2 cores)
    python benchmarks/robustness.py --quick    # 1 seed (about a minute or two)

Writes ``benchmarks/out/robustness.json``, ``robustness.md`` (tables) and
``robustness.png`` (heatmaps), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _environment import RULES, environment  # noqa: E402

import clair_jax as cj  # noqa: E402
from clair_jax._src.federated.attacks import attack  # noqa: E402

KINDS = (
    "random",
    "scaled",
    "sign_flip",
    "coordinated_flip",
    "own_subspace",
    "nan",
    "huge",
)
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6)
#: Kinds CLAIR claims to detect (all of them: a sign flip of one's own update is far
#: from the benign clients' common update in this model).
CLAIR_DETECTS = KINDS


def make_rule(name: str, n: int, f: int):
    """The aggregator ``name`` for ``n`` clients, ``f`` of them attackers."""
    if name == "krum":
        return cj.krum(f)
    if name == "multi_krum":
        return cj.multi_krum(f, n - f)
    if name == "clair":
        return cj.clair_aggregator()
    if name == "trimmed_mean":
        return cj.trimmed_mean(0.1)
    return getattr(cj, name)()


def federation(seed: int, kind: str, fraction: float, n: int, p: int, q: int, r: int, h: float):
    """``(start, sent, attackers, benign_mean)``: the round's factors (module docstring)."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(p, r)))[0]
    m = rng.normal(size=(r, r))
    a_star = rng.normal(size=(r, q)) * np.sqrt(r / q)
    nu = 0.01 * np.sqrt(np.mean(m**2) * r / p)
    b0 = u @ m

    def benign(count):
        b = np.einsum("pr,nrs->nps", u, m[None] + h * rng.normal(size=(count, r, r)))
        b = b + nu * rng.normal(size=b.shape)
        a = a_star[None] + h * np.sqrt(r / q) * rng.normal(size=(count, r, q))
        return b, a

    trained_b, trained_a = benign(n)
    k = int(round(fraction * n))
    bad = np.zeros(n, bool)
    bad[rng.permutation(n)[:k]] = True
    start_b = np.broadcast_to(b0, (n, p, r)).copy()
    start_a = np.zeros((n, r, q))
    benign_mean = np.einsum("npr,nrq->pq", trained_b[~bad], trained_a[~bad]) / max((~bad).sum(), 1)
    sent_b, sent_a = trained_b.copy(), trained_a.copy()
    if k and kind in ("scaled", "sign_flip", "coordinated_flip"):
        scale = {"scaled": 5.0, "sign_flip": -1.0, "coordinated_flip": -3.0}[kind]
        sent = attack(
            {"m": cj.LoRAFactors(jnp.asarray(start_b), jnp.asarray(start_a))},
            {"m": cj.LoRAFactors(jnp.asarray(trained_b), jnp.asarray(trained_a))},
            jnp.asarray(np.where(bad, scale, 1.0)),
            jnp.asarray(bad & (kind == "coordinated_flip")),
        )["m"]
        sent_b, sent_a = np.asarray(sent.B, np.float64), np.asarray(sent.A, np.float64)
        if kind == "coordinated_flip":  # the group's common update, each with benign noise
            sent_b[bad] += nu * rng.normal(size=(k, p, r))
    elif k and kind == "random":
        sent_b[bad] = rng.normal(size=(k, p, r)) * np.sqrt(np.mean(trained_b**2))
        sent_a[bad] = rng.normal(size=(k, r, q)) * np.sqrt(np.mean(trained_a**2))
    elif k and kind == "own_subspace":
        u2 = np.linalg.qr(rng.normal(size=(p, r)))[0]
        sent_b[bad] = (u2 @ m)[None] + nu * rng.normal(size=(k, p, r))
    elif k and kind == "nan":
        sent_b[bad] = np.nan
    elif k and kind == "huge":
        peak = np.max(np.abs(sent_b[bad]), axis=(1, 2), keepdims=True)
        sent_b[bad] = sent_b[bad] / peak * 1e20
    f32 = np.float32
    start = cj.LoRAFactors(jnp.asarray(b0, f32), jnp.zeros((r, q), f32))
    sent = cj.LoRAFactors(jnp.asarray(sent_b, f32), jnp.asarray(sent_a, f32))
    return start, sent, bad, benign_mean


def f1_score(flagged: np.ndarray, bad: np.ndarray) -> float | None:
    """F1 of ``flagged`` against ``bad`` (None without attackers)."""
    if not bad.any():
        return None
    tp = int(np.sum(flagged & bad))
    if tp == 0:
        return 0.0
    precision, recall = tp / flagged.sum(), tp / bad.sum()
    return float(2 * precision * recall / (precision + recall))


def run_cell(rule_name, kind, fraction, seed, n, p, q, r, h):
    """``{"error", "f1", "false_positives"}`` or ``{"refused": message}``."""
    start, sent, bad, benign_mean = federation(seed, kind, fraction, n, p, q, r, h)
    f = int(bad.sum())
    try:
        rule = make_rule(rule_name, n, f)
        kwargs = {"start": {"m": jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), start)}}
        kwargs = kwargs if rule.uses_start else {}
        res = rule.aggregate(
            {"m": sent}, {"m": start}, jnp.full((n,), 1.0 / n), 2, jax.random.key(seed), **kwargs
        )
        g = res.global_["m"]
        product = np.asarray(g.B, np.float64) @ np.asarray(g.A, np.float64)
        flagged = np.asarray(res.flagged, bool)
    except (ValueError, FloatingPointError) as err:
        return {"refused": str(err).splitlines()[0][:200]}
    with np.errstate(all="ignore"):
        error = np.linalg.norm(product - benign_mean) / np.linalg.norm(benign_mean)
    return {
        "error": float(error) if np.isfinite(error) else float("inf"),
        "f1": f1_score(flagged, bad),
        "false_positives": int(np.sum(flagged & ~bad)),
    }


def summarise(cells: list[dict]) -> dict:
    """Mean over seeds (refused when any seed refused)."""
    refused = [c["refused"] for c in cells if "refused" in c]
    if refused:
        return {"refused": refused[0]}
    f1s = [c["f1"] for c in cells if c["f1"] is not None]
    return {
        "error": float(np.mean([c["error"] for c in cells])),
        "f1": float(np.mean(f1s)) if f1s else None,
        "false_positives": float(np.mean([c["false_positives"] for c in cells])),
    }


def cell_text(c: dict) -> str:
    if "refused" in c:
        return "refused"
    e = c["error"]
    return "inf" if not np.isfinite(e) else (f"{e:.3f}" if e < 10 else f"{e:.1e}")


def targets(results: dict) -> dict:
    """CLAIR against the geometric median up to 45%, and CLAIR's mean F1."""
    grid = results["grid"]
    worse, f1s = [], []
    for kind in KINDS:
        for frac in results["fractions"]:
            key = f"{frac:g}"
            c, g = grid["clair"][kind][key], grid["geometric_median"][kind][key]
            if frac <= 0.45 and "error" in c:
                g_err = g.get("error", float("inf"))
                if c["error"] > g_err + 1e-6:
                    worse.append(f"{kind} {frac:.0%}: {c['error']:.4f} > {g_err:.4f}")
            if kind in CLAIR_DETECTS and 0 < frac <= 0.45 and c.get("f1") is not None:
                f1s.append(c["f1"])
    return {
        "clair_worse_than_geometric_median": worse,
        "clair_mean_f1_up_to_45": float(np.mean(f1s)) if f1s else None,
    }


def markdown(results: dict) -> str:
    """Tables: error per fraction (rules x kinds), F1 of the flagging rules, targets."""
    grid, s = results["grid"], results["setup"]
    lines = [
        f"Relative error of the global update against the benign mean update; n={s['n']}, "
        f"p={s['p']}, q={s['q']}, r={s['r']}, heterogeneity {s['h']}, mean over "
        f"{s['seeds']} seed(s). `refused`: the rule raised.",
    ]
    head = "| rule | " + " | ".join(KINDS) + " |"
    for frac in results["fractions"]:
        lines += ["", f"**{frac:.0%} attackers**", "", head, "|---|" + "---|" * len(KINDS)]
        for rule in RULES:
            row = [cell_text(grid[rule][kind][f"{frac:g}"]) for kind in KINDS]
            lines.append(f"| {rule} | " + " | ".join(row) + " |")
    lines += [
        "",
        "**Detection F1** (mean over the fractions 10–45% where the rule ran; rules that "
        "flag; Krum flags all clients but one by design):",
        "",
        head,
        "|---|" + "---|" * len(KINDS),
    ]
    for rule in ("krum", "multi_krum", "clair"):
        row = []
        for kind in KINDS:
            vals = [
                grid[rule][kind][f"{f:g}"].get("f1") for f in results["fractions"] if 0 < f <= 0.45
            ]
            vals = [v for v in vals if v is not None]  # None: the rule refused
            row.append(f"{np.mean(vals):.2f}" if vals else "refused")
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    t = results["targets"]
    worse = t["clair_worse_than_geometric_median"]
    lines += [
        "",
        f"CLAIR's error is at or below the geometric median's in every cell up to 45% "
        f"where CLAIR runs: **{'yes' if not worse else 'no'}**"
        + ("" if not worse else " (" + "; ".join(worse) + ")")
        + f"; CLAIR's mean detection F1 (10–45%, all kinds it runs on): "
        f"**{t['clair_mean_f1_up_to_45']:.3f}**.",
    ]
    return "\n".join(lines)


def heatmap(results: dict, path: Path) -> None:
    """One panel per attack kind: rules x fractions, colour = log10 relative error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, fracs = results["grid"], results["fractions"]
    fig, axes = plt.subplots(1, len(KINDS), figsize=(3.0 * len(KINDS), 4.6), sharey=True)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    for ax, kind in zip(axes, KINDS, strict=True):
        vals = np.full((len(RULES), len(fracs)), np.nan)
        for i, rule in enumerate(RULES):
            for j, f in enumerate(fracs):
                c = grid[rule][kind][f"{f:g}"]
                if "error" in c:
                    vals[i, j] = np.log10(min(max(c["error"], 1e-4), 1e4))
        im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=-4, vmax=2, aspect="auto")
        for i, rule in enumerate(RULES):
            for j, f in enumerate(fracs):
                text = cell_text(grid[rule][kind][f"{f:g}"])
                if "e" in text and text != "refused":  # 9e18: fits the cell
                    text = f"{grid[rule][kind][f'{f:g}']['error']:.0e}".replace("e+", "e")
                text = "ref." if text == "refused" else text
                light = np.isfinite(vals[i, j]) and vals[i, j] > 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=5.5,
                        color="black" if light else "white")  # fmt: skip
        ax.set_xticks(range(len(fracs)), [f"{f:.0%}" for f in fracs], fontsize=7)
        ax.set_title(kind, fontsize=9)
    axes[0].set_yticks(range(len(RULES)), RULES, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 relative error (grey: refused)")
    fig.suptitle("Relative error of the global update vs the benign mean (x: attacker fraction)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--p", type=int, default=64)
    parser.add_argument("--q", type=int, default=64)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--h", type=float, default=0.3, help="heterogeneity")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    t0 = time.time()
    grid: dict = {}
    for rule in rules:
        grid[rule] = {}
        for kind in KINDS:
            grid[rule][kind] = {}
            for frac in FRACTIONS:
                cells = [
                    run_cell(rule, kind, frac, s, args.n, args.p, args.q, args.r, args.h)
                    for s in range(seeds)
                ]
                grid[rule][kind][f"{frac:g}"] = summarise(cells)
        print(f"{rule}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    results = {
        "environment": environment(),
        "setup": {
            "n": args.n,
            "p": args.p,
            "q": args.q,
            "r": args.r,
            "h": args.h,
            "seeds": seeds,
            "quick": args.quick,
        },
        "fractions": list(FRACTIONS),
        "kinds": list(KINDS),
        "rules": rules,
        "grid": grid,
        "seconds": time.time() - t0,
    }
    if set(rules) == set(RULES):
        results["targets"] = targets(results)
        text = markdown(results)
        print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(results, indent=2))
    if "targets" in results:
        (out / "robustness.md").write_text(text + "\n")
        heatmap(results, out / "robustness.png")
    return results


if __name__ == "__main__":
    main()
