"""The notebooks run top to bottom, offline, in a temporary working directory, on this interpreter's kernel,
each within its time budget; they show pictures inline; the committed files carry no outputs.

Notebooks live in the repository (notebooks/), next to the tests; the kernel is ipykernel's `python3` spec from
this interpreter's prefix, and the first thing each run checks is that the kernel is this very environment."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_toy.ipynb", "03_fmnist_completion.ipynb", "04_finetune.ipynb"]
BUDGET_S = 180          # per notebook, wall clock on a 2-core CPU machine (they take 20-90 s there)
PROBE = "import json, sys\nprint(json.dumps({'prefix': sys.prefix, 'executable': sys.executable}))"


def stored(name: str):
    path = NOTEBOOKS / name
    assert path.is_file(), f"{path} is missing (regenerate with python notebooks/make_notebooks.py)"
    return nbformat.read(path, as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = stored(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: code cell {i} carries outputs"


def test_notebooks_match_their_generator():
    """The .ipynb files are what make_notebooks.py writes (edit the generator, then re-run it)."""
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(NOTEBOOKS))
    assert sorted(make_notebooks.NOTEBOOKS) == NAMES
    for name, cells in make_notebooks.NOTEBOOKS.items():
        assert make_notebooks.build(cells) == stored(name), f"{name} differs from make_notebooks.py: re-run it"


def kernel_manager():
    """A kernel of this interpreter: the python3 spec installed by ipykernel into sys.prefix (jupyter_client
    starts a spec whose argv[0] is `python` with sys.executable), never one from the user's own spec folders."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    specs = KernelSpecManager(kernel_dirs=[str(Path(sys.prefix) / "share" / "jupyter" / "kernels")])
    assert "python3" in specs.find_kernel_specs(), "ipykernel's python3 kernelspec is not installed in sys.prefix"
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    nb = stored(name)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    env_before = os.environ.get("MPLBACKEND")
    os.environ.pop("MPLBACKEND", None)                     # let the kernel pick its inline backend
    km = kernel_manager()
    client = nbclient.NotebookClient(nb, km=km, timeout=BUDGET_S, resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{str(err)[-4000:]}")
    finally:
        if km.has_kernel:                                   # a kernel manager we pass in is ours to shut down
            km.shutdown_kernel(now=True)
        if env_before is not None:
            os.environ["MPLBACKEND"] = env_before
    elapsed = time.monotonic() - start
    print(f"{name}: {elapsed:.1f} s")
    probe = json.loads(nb.cells[0].outputs[0]["text"])
    assert probe["prefix"] == sys.prefix, f"the kernel ran {probe['executable']}, not this interpreter ({sys.executable})"
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f} s (budget {BUDGET_S} s)"
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = sum("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    if name.startswith("03") and "SKIPPED: Fashion-MNIST is not installed" in text:
        from cgml_lightning.data.fashion_mnist import find_files

        assert find_files(None) is None, "03 skipped although Fashion-MNIST is installed"
        return
    assert pictures >= 1, f"{name} showed no picture inline"
