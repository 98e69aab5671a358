"""Execute the notebooks headless, on the CPU, at small sizes (nbclient + ipykernel).

Each notebook's cell tagged ``parameters`` is followed by an injected cell that overrides its sizes (the
papermill convention), and a final injected cell checks what the notebook computed. The kernel is
ipykernel in this very interpreter, from a kernelspec written into tmp_path, so the tests need no
installed kernelspec and cannot pick up another environment's. Everything the notebooks write goes
into tmp_path, never into the repository: paper_figures reads results files made here by short runs
of the benchmark scripts, and Python writes no bytecode next to benchmarks/.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BENCH = REPO / "benchmarks"
TIMEOUT = 300  # seconds per cell

# Small digits runs, one thread, no progress bars (the options tests/test_benchmarks_smoke.py uses).
DIGITS = ["--device", "cpu", "--threads", "1", "--progress", "false", "--epochs", "2", "--n-train", "120",
          "--n-val", "60", "--n-test", "60", "--batch-size", "30", "--val-batch-size", "30", "--width", "16"]


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch):
    """One torch thread unless told otherwise, and no __pycache__ written into the checkout."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec for ipykernel in this interpreter (sys.executable), in a private folder."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(path=root / "python3", overrides={"display_name": "ohotorch tests"})
    return root


def execute(name: str, kernel_dir: Path, parameters: str, checks: str = "") -> "nbformat.NotebookNode":
    """Run notebooks/<name> with ``parameters`` injected after its parameters cell and ``checks`` appended;
    return the executed notebook (raises nbclient's CellExecutionError with the traceback on failure)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(textwrap.dedent(parameters)))
    if checks:
        nb.cells.append(nbformat.v4.new_code_cell(textwrap.dedent(checks)))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb) -> tuple:
    """(all text the notebook printed, the number of images it displayed)."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            images += "image/png" in data
            if "text/plain" in data:
                text.append(data["text/plain"])
    return "\n".join(text), images


@pytest.mark.parametrize("name", ["quickstart.ipynb", "paper_figures.ipynb"])
def test_notebook_is_committed_clean(name):
    """Notebooks are stored without outputs, so that diffs show code only."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} has stored outputs"


def test_quickstart(kernel_dir):
    nb = execute("quickstart.ipynb", kernel_dir, """
        EPOCHS = 2
        LAYERWISE_EPOCHS = 1
    """, checks="""
        steps = 2 * (len(train_set) // BATCH_SIZE)
        assert len(tuned["lr"]) == len(frozen["lr"]) == steps
        assert all(v == [LR0] for v in frozen["lr"])            # SGD: frozen
        assert tuned["lr"][-1][0] > 2 * LR0                      # OHO: climbs out of the poor start
        assert tuned["weight_decay"][-1][0] != WD0
        assert tuned["val_loss"][-1] < frozen["val_loss"][-1]
        assert tuned_opt.counters["hyper_steps"] == steps
        assert [g["name"] for g in layer_opt.param_groups] == ["fc1", "fc2", "out"]
        assert len({g["lr"] for g in layer_opt.param_groups}) == 3  # one lr per layer, each its own
    """)
    text, images = outputs(nb)
    assert images >= 2
    assert "fc1" in text and "out" in text and "lr =" in text


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """Tiny compare, search and robustness results files, made by the benchmark scripts (one process)."""
    root = tmp_path_factory.mktemp("results")
    runs = [
        ("digits", DIGITS + ["--methods", "sgd,cosine,oho_global,oho_layer_blockwise",
                             "--out", str(root / "digits" / "compare_mlp.json")]),
        ("search", DIGITS + ["--task", "digits", "--trials", "2", "--search-methods", "sgd",
                             "--samplers", "random", "--out", str(root / "digits" / "search_mlp.json")]),
        ("robustness", DIGITS + ["--task", "digits", "--grid-lrs", "0.03,0.3", "--grid-wds", "1e-4",
                                 "--resets", "lr=1.0", "--out", str(root / "digits" / "robustness_mlp.json")]),
    ]
    script = "import importlib, sys\nsys.path.insert(0, sys.argv[1])\n" + "".join(
        f"importlib.import_module({module!r}).main({argv!r})\n" for module, argv in runs)
    done = subprocess.run([sys.executable, "-c", script, str(BENCH)], cwd=str(root), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root


def test_paper_figures(kernel_dir, results_dir, tmp_path):
    figures = tmp_path / "figures"
    nb = execute("paper_figures.ipynb", kernel_dir, f"""
        RESULTS_DIR = {str(results_dir)!r}
        FIG_DIR = {str(figures)!r}
        STRICT = True
    """, checks="""
        assert not failures, failures
        assert sorted(p["kind"] for p in results.values()) == ["compare", "robustness", "search"]
        drawn = {png.parent.name + "/" + png.name.partition("_mlp_")[0] for png in figures}
        assert {"digits/compare", "digits/search", "digits/robustness"} <= drawn, drawn
        assert all(png.is_file() and png.stat().st_size > 0 for png in figures)
    """)
    text, images = outputs(nb)
    pngs = sorted(figures.rglob("*.png"))
    assert pngs and images == len(pngs)
    assert "oho_global" in text and "time to target" in text
    assert not list(results_dir.rglob("*.png")), "figures must go to FIG_DIR, not beside the results"


def test_paper_figures_without_results(kernel_dir, tmp_path):
    """No results files: the notebook makes a tiny digits comparison itself and draws it."""
    empty, generated = tmp_path / "empty", tmp_path / "generated"
    empty.mkdir()
    execute("paper_figures.ipynb", kernel_dir, f"""
        RESULTS_DIR = {str(empty)!r}
        FIG_DIR = {str(tmp_path / "figures")!r}
        FALLBACK_DIR = {str(generated)!r}
        FALLBACK_ARGS = {DIGITS + ["--methods", "sgd,oho_global"]!r}
        STRICT = True
    """, checks=f"""
        assert results_dir == Path({str(generated)!r}).resolve()
        assert [p["kind"] for p in results.values()] == ["compare"] and figures and not failures
    """)
    assert (generated / "digits" / "compare_mlp.json").is_file()
    assert not list(empty.iterdir())
