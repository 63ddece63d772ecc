"""The notebooks run top to bottom (small configuration) and are committed without outputs.

Execution needs ``nbclient``, ``nbformat`` and ``ipykernel`` (the ``dev`` extras);
without them those tests are skipped. The kernel inherits this process's
environment, with ``CLAIR_JAX_NOTEBOOK_SMALL=1``.
"""

import json
import pathlib
import re

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart.ipynb", "colab_tpu_federated.ipynb"]
SKIP = "notebook execution needs nbclient, nbformat and ipykernel: pip install -e '.[dev]'"


def _execute(name: str, workdir: pathlib.Path):
    """Runs the notebook in a fresh python3 kernel; returns it with its outputs."""
    nbformat = pytest.importorskip("nbformat", reason=SKIP)
    nbclient = pytest.importorskip("nbclient", reason=SKIP)
    pytest.importorskip("ipykernel", reason=SKIP)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return notebook


def _text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def _images(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    with open(NOTEBOOKS / name, encoding="utf-8") as f:
        notebook = json.load(f)
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell["outputs"] == [], f"{name}: code cell {i} has outputs"
        assert cell["execution_count"] is None, f"{name}: code cell {i} has an execution count"


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_JAX_NOTEBOOK_SMALL", "1")
    notebook = _execute("quickstart.ipynb", tmp_path)
    text = _text(notebook)
    assert "n=20 clients" in text  # the small configuration was used
    assert "decompose: precision 1.00, recall 1.00, F1 1.00" in text
    assert "rank 2 (true 2)" in text
    assert "CLAIR detection: precision 1.00" in text
    assert _images(notebook) == 2


@pytest.mark.slow
def test_colab_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAIR_JAX_NOTEBOOK_SMALL", "1")
    notebook = _execute("colab_tpu_federated.ipynb", tmp_path)
    text = _text(notebook)
    assert "CPU device(s)" in text
    assert "| fedit |" in text and "| clair |" in text  # the results table
    assert "flagged [" in text
    assert re.search(r"clair \[#+\] 2/2", text), text[:2000]  # the rounds' progress bar
    found = re.search(r"max \|sharded - single device\| = (\S+)\n", text)
    assert found and float(found.group(1)) <= 1e-5, text[-500:]
    assert _images(notebook) == 1


def _install_finder():
    """``clair_jax_source`` from the Colab notebook's install cell (not run: no pip here)."""
    pytest.importorskip("nbformat", reason=SKIP)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_build", NOTEBOOKS / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    code = build.INSTALL.removesuffix("install_clair_jax()")
    namespace = {}
    exec(code, namespace)
    return namespace["clair_jax_source"]


def test_install_cell_finds_a_copy_of_the_repository(tmp_path, monkeypatch):
    find = _install_finder()
    monkeypatch.delenv("CLAIR_JAX_SOURCE", raising=False)
    clone = tmp_path / "clair_jax-main"
    (clone / "notebooks").mkdir(parents=True)
    (clone / "pyproject.toml").write_text('[project]\nname = "clair_jax"\n')
    monkeypatch.chdir(tmp_path)  # Colab: /content with the upload one folder down
    assert find() == str(clone)
    monkeypatch.chdir(clone / "notebooks")  # Jupyter: the notebook's folder
    assert find() == str(clone)
    wheel = clone / "notebooks" / "clair_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert find() == str(wheel)  # a wheel next to the notebook comes first
    monkeypatch.setenv("CLAIR_JAX_SOURCE", "/somewhere/else")
    assert find() == "/somewhere/else"


def test_install_cell_pins_no_jax():
    text = (NOTEBOOKS / "colab_tpu_federated.ipynb").read_text(encoding="utf-8")
    assert "jax[" not in text and "OWNER" not in text
