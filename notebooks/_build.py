"""Writes the notebooks of this folder from the cell sources below (outputs stripped).

Run ``python notebooks/_build.py`` after editing a cell here; the ``.ipynb``
files are generated, so that they stay free of outputs and execution counts in
git. ``tests/test_notebooks.py`` executes them with ``CLAIR_JAX_NOTEBOOK_SMALL=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

QUICKSTART = [
    new_markdown_cell(
        """# clair_jax quickstart

Two steps on synthetic data, on whatever device JAX finds (a laptop CPU is enough):

1. **`cj.decompose`**: split the stacked client updates `[X_1 … X_n] = L + S` into a
   low-rank part (the shared subspace) and a block-sparse part (non-zero only on the
   contaminated clients' blocks).
2. **`cj.clair`**: the whole CLAIR pipeline (noise level, λ's, rank, detection and
   refinement chosen from the data) on a federation of linear-regression clients from
   `clair_jax.simulate`.

Set `CLAIR_JAX_NOTEBOOK_SMALL=1` for smaller problems (what the test suite runs)."""
    ),
    new_code_cell(
        """import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import clair_jax as cj
from clair_jax import simulate

SMALL = os.environ.get("CLAIR_JAX_NOTEBOOK_SMALL") == "1"
n, p, q, r = (20, 32, 8, 2) if SMALL else (40, 64, 16, 3)
print(f"JAX {jax.__version__} on {jax.devices()}; n={n} clients, updates {p}x{q}, rank {r}")"""
    ),
    new_markdown_cell(
        """## 1. The decomposition on a simulated federation

`simulate.shared_subspace_updates`: benign clients send `X_i = U V_iᵀ + E_i` (a shared
`p × r` basis `U`, noise `E_i` of standard deviation `noise`); 20% of the clients send a
dense matrix instead. With the noise level known, the λ's follow the rule CLAIR uses:
`λ_* = 2σ(√p + √(nq))`, `λ_S = 2σ√(pq)`."""
    ),
    new_code_cell(
        """noise = 0.01
fed = simulate.shared_subspace_updates(
    jax.random.key(0), n=n, p=p, q=q, rank=r, fraction=0.2, noise=noise
)
lam_nuc = 2 * noise * (np.sqrt(p) + np.sqrt(n * q))
lam_block = 2 * noise * np.sqrt(p * q)
sol = cj.decompose(fed.updates, lam_nuc=lam_nuc, lam_block=lam_block, method="fista")

block_norms = np.linalg.norm(np.asarray(sol.sparse), axis=(1, 2))
flagged = block_norms > 0
truth = np.asarray(fed.contaminated)
m = cj.detection_metrics(flagged, truth)
print(f"{int(sol.num_iters)} FISTA iterations, converged: {bool(sol.converged)}, "
      f"rank of L: {int(sol.rank)} (true {r})")
print(f"flagged clients {np.flatnonzero(flagged).tolist()}, "
      f"contaminated {np.flatnonzero(truth).tolist()}")
print(f"decompose: precision {float(m.precision):.2f}, recall {float(m.recall):.2f}, "
      f"F1 {float(m.f1):.2f}")"""
    ),
    new_code_cell(
        """fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
sv_data = np.linalg.svd(np.asarray(cj.blocks_to_matrix(fed.updates)), compute_uv=False)
sv_low = np.linalg.svd(np.asarray(cj.blocks_to_matrix(sol.low_rank)), compute_uv=False)
ax1.semilogy(sv_data, "o-", ms=3, label="updates [X_1 … X_n]")
ax1.semilogy(np.maximum(sv_low, 1e-12), "s-", ms=3, label="low-rank part L")
ax1.axhline(lam_nuc, color="gray", ls="--", label="λ_*")
ax1.set_ylim(1e-3, None)
ax1.set_xlabel("index")
ax1.set_ylabel("singular value")
ax1.legend()
ax2.bar(np.arange(n), block_norms, color=np.where(truth, "tab:red", "tab:blue"))
ax2.set_xlabel("client (red: contaminated)")
ax2.set_ylabel("||S_i||_F")
ax2.set_title("block norms of the sparse part")
fig.tight_layout()
plt.show()"""
    ),
    new_markdown_cell(
        """## 2. CLAIR on regression clients

Each client fits a least-squares model `Θ̂_i` on `2p` samples of `y = Θ_iᵀ x + ε`;
`Θ_i = W_0 + U V_iᵀ` (a common offset `W_0`, hence `offset=True`). 30% of the clients
are contaminated: a dense model, a scaled model, or noisy labels. `cj.clair` picks
everything from the data; `res.refined` projects each client's estimate on the shared
subspace and fills the rest with the consensus of the collaborative clients."""
    ),
    new_code_cell(
        """data = simulate.linear_regression(
    jax.random.key(1), n=n, p=p, q=q, rank=r, samples=2 * p, fraction=0.3,
    kind=("dense", "scaled", "label_noise"),
)
local = simulate.least_squares(data.features, data.responses)
res = cj.clair(local, offset=True)

truth = np.asarray(data.contaminated)
benign = ~truth
m = cj.detection_metrics(~res.collaborative, truth)


def errors(estimates):
    return np.linalg.norm(np.asarray(estimates - data.parameters), axis=(1, 2))[benign]


local_err, clair_err = errors(local), errors(res.refined)
print(f"rank {int(res.rank)} (true {r}), subspace distance "
      f"{float(cj.subspace_distance(res.basis, data.basis)):.3f}, noise σ̂ "
      f"{float(res.noise_scale):.3f}")
print(f"CLAIR detection: precision {float(m.precision):.2f}, recall {float(m.recall):.2f}, "
      f"F1 {float(m.f1):.2f}")
print(f"benign clients' error: local {local_err.mean():.3f}, CLAIR {clair_err.mean():.3f} "
      f"(ratio {clair_err.mean() / local_err.mean():.2f})")"""
    ),
    new_code_cell(
        """fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
scores = np.asarray(res.scores)
ax1.bar(np.arange(n), scores, color=np.where(truth, "tab:red", "tab:blue"))
ax1.axhline(float(res.threshold), color="k", ls="--", label="threshold τ")
ax1.scatter(np.flatnonzero(~np.asarray(res.collaborative)),
            scores[~np.asarray(res.collaborative)] * 1.05, marker="v", color="k",
            label="flagged")
ax1.set_yscale("log")
ax1.set_xlabel("client (red: contaminated)")
ax1.set_ylabel("off-subspace residual d_i")
ax1.legend()
ax2.scatter(local_err, clair_err)
lim = [0, 1.05 * max(local_err.max(), clair_err.max())]
ax2.plot(lim, lim, color="gray", ls="--")
ax2.set_xlabel("local least-squares error")
ax2.set_ylabel("CLAIR refined error")
ax2.set_title("benign clients: ||Θ̂_i − Θ_i||_F")
fig.tight_layout()
plt.show()"""
    ),
    new_markdown_cell(
        """Next: `notebooks/colab_tpu_federated.ipynb` runs federated LoRA fine-tuning of a small
Transformer with CLAIR and the baselines (on a TPU or GPU runtime when there is one)."""
    ),
]

INSTALL = """# Installs clair_jax if it is not importable yet, from (first found): $CLAIR_JAX_SOURCE
# (anything pip accepts), a wheel clair_jax-*.whl here or in /content, or the repository
# this notebook sits in / was cloned or unzipped into (here or one folder down). The
# runtime's JAX is kept: jax and jaxlib are held at their installed versions.


def clair_jax_source():
    import glob
    import os
    import pathlib

    if os.environ.get("CLAIR_JAX_SOURCE"):
        return os.environ["CLAIR_JAX_SOURCE"]
    here = os.getcwd()
    wheels = [w for d in (here, "/content") for w in glob.glob(os.path.join(d, "clair_jax-*.whl"))]
    if wheels:
        return max(wheels, key=os.path.getmtime)
    ups = [here, *map(str, pathlib.Path(here).parents)]
    downs = sorted(glob.glob(os.path.join(here, "*", "")))
    for folder in [*ups, *downs, *sorted(glob.glob("/content/*/"))]:
        try:
            with open(os.path.join(folder, "pyproject.toml"), encoding="utf-8") as f:
                if 'name = "clair_jax"' in f.read():
                    return os.path.abspath(folder)
        except OSError:
            continue
    return None


def install_clair_jax():
    import importlib
    import importlib.metadata
    import importlib.util
    import subprocess
    import sys
    import tempfile

    if importlib.util.find_spec("clair_jax") is not None:
        return
    source = clair_jax_source()
    if source is None:
        raise RuntimeError(
            "clair_jax is not installed and no copy of it was found: upload the repository "
            "(or a wheel from `python -m build`) next to this notebook, or set "
            "CLAIR_JAX_SOURCE to a path, wheel or URL pip can install."
        )
    held = [f"{name}=={importlib.metadata.version(name)}" for name in ("jax", "jaxlib")
            if importlib.util.find_spec(name) is not None]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\\n".join(held))
    print(f"installing clair_jax from {source}, keeping {', '.join(held) or 'no JAX yet'}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name, source],
        check=True,
    )
    importlib.invalidate_caches()


install_clair_jax()"""

COLAB = [
    new_markdown_cell(
        """# Federated LoRA with CLAIR on a TPU, GPU or CPU

Federated fine-tuning of a small LoRA Transformer on the text-copying task
(`clair_jax.experiments.text_copy`): clients re-map tokens, partly the same way, partly
their own way; 30% are contaminated. Every method trains the same federation from the
same pre-trained base, and we plot the benign clients' held-out accuracy per round and
the clients each method flagged.

**On Colab**: *Runtime → Change runtime type* → a TPU or GPU; upload the repository
(or clone it, or upload a wheel built with `python -m build`) to the runtime, then
*Run all*. The first cell installs clair_jax when it is not importable, from that copy,
keeping the runtime's own JAX (it is skipped by our tests, which run this notebook with
clair_jax installed). The round loop shows a progress bar in the notebook. Set
`CLAIR_JAX_NOTEBOOK_SMALL=1` for a one-minute configuration."""
    ),
    new_code_cell(INSTALL),
    new_code_cell(
        """import os
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import clair_jax as cj
from clair_jax.experiments import text_copy

devices = jax.devices()
kind = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU"}.get(jax.default_backend(), "other")
print(f"JAX {jax.__version__}: {len(devices)} {kind} device(s)")
for d in devices:
    print(f"  {d.id}: {d.device_kind}")"""
    ),
    new_markdown_cell(
        """## The experiment

`text_copy.parse_args` takes the command-line flags of
`python -m clair_jax.experiments.text_copy` (see `--help`). The small configuration is
what the test suite runs; the default is the experiment's `--quick` setting with a few
baselines."""
    ),
    new_code_cell(
        """SMALL = os.environ.get("CLAIR_JAX_NOTEBOOK_SMALL") == "1"
if SMALL:
    argv = ["--clients", "8", "--rounds", "2", "--local-steps", "2", "--pretrain-steps", "50",
            "--rank", "4", "--layers", "1", "--methods", "fedit,clair", "--no-cache"]
else:
    argv = ["--quick", "--methods", "local_only,fedit,fedrot,trimmed_mean,krum,clair"]
args = text_copy.parse_args(argv)
start = time.perf_counter()
out = text_copy.run(args)
print(f"{time.perf_counter() - start:.1f} s")
print(text_copy.format_table(out["methods"]))"""
    ),
    new_code_cell(
        """methods = list(out["methods"])
truth = np.asarray(out["contaminated"])
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4),
                               gridspec_kw={"width_ratios": [1.2, 1]})
for name in methods:
    curve = out["methods"][name]["curve"]
    ax1.plot(range(1, len(curve) + 1), curve, "o-", label=name, lw=2.5 if name == "clair" else 1.2)
ax1.axhline(out["base_accuracy"], color="gray", ls="--", label="base model")
ax1.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
ax1.set_xlabel("round")
ax1.set_ylabel("benign held-out token accuracy")
ax1.legend(fontsize=8)
flags = np.array([out["methods"][name]["detection"]["flagged"] for name in methods], bool)
ax2.imshow(np.vstack([truth, flags]), cmap="Greys", vmin=0, vmax=1, aspect="auto")
ax2.axhline(0.5, color="tab:red", lw=2)
ax2.set_yticks(range(len(methods) + 1), ["contaminated"] + methods)
ax2.set_xlabel("client")
ax2.set_title("flagged clients (black)")
fig.tight_layout()
plt.show()
for name in methods:
    d = out["methods"][name]["detection"]
    f1 = "-" if d["f1"] is None else f"{d['f1']:.2f}"
    print(f"{name:>17s}: flagged {np.flatnonzero(d['flagged']).tolist()}, F1 {f1}")"""
    ),
    new_markdown_cell(
        """## The same round on every device

`cj.make_sharded_round` splits the client axis over all devices of a mesh (one device
here if there is only one): each device trains its own clients and the compiler inserts
the collectives of the aggregation. The result equals the single-device round up to
floating-point reassociation. The client count must be divisible by the device count."""
    ),
    new_code_cell(
        """from flax import nnx

config = cj.TransformerConfig(vocab_size=8, max_len=6, width=8, num_heads=2, mlp_width=8,
                              num_layers=1, lora_rank=2)
graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
num_clients = 2 * len(devices)
fed = cj.data.make_federation(jax.random.key(1), cj.data.FederationConfig(
    num_clients=num_clients, vocab_size=8, length=3, shared_tokens=2, specific_tokens=1))
state = cj.init_server_state(adapters, num_clients)
mesh = cj.client_mesh()
single = cj.make_round(graphdef, base, cj.fedit(), local_steps=2, batch_size=4)
sharded = cj.make_sharded_round(graphdef, base, cj.fedit(), mesh, local_steps=2, batch_size=4)
s1, _ = single(state, fed.train, jax.random.key(2))
s2, _ = sharded(state, fed.train, jax.random.key(2))
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True))
leaf = jax.tree.leaves(s2.clients)[0]
print(f"{num_clients} clients on a mesh of {mesh.size} device(s); the new client adapters "
      f"lie on {len(leaf.sharding.device_set)} device(s), "
      f"{leaf.addressable_shards[0].data.shape[0]} client(s) each")
print(f"max |sharded - single device| = {diff:.1e}")"""
    ),
]


def write(cells, name: str) -> str:
    stem = os.path.splitext(name)[0].replace("_", "-")
    for i, cell in enumerate(cells):
        cell["id"] = f"{stem}-{i}"  # stable ids: regenerating does not churn the diff
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    nbformat.validate(nb)
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    return path


def main() -> None:
    paths = [
        write(cells, name)
        for cells, name in ((QUICKSTART, "quickstart.ipynb"), (COLAB, "colab_tpu_federated.ipynb"))
    ]
    ruff = shutil.which("ruff")
    if ruff:  # the cells in the house style (ruff lints and formats notebooks too)
        subprocess.run([ruff, "format", "--quiet", *paths], check=True)
    else:
        print("ruff not found: the cells are written unformatted")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
