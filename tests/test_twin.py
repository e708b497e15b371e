"""hw2.ipynb and hw2.py are one program: the notebook rendered as py:percent must equal the script."""
import os
import subprocess
import sys

from conftest import ROOT

JUPYTEXT = [sys.executable, "-m", "jupytext"]


def render(ipynb):
    out = subprocess.run([*JUPYTEXT, "--to", "py:percent", "-o", "-", ipynb],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_notebook_and_script_are_identical():
    with open(os.path.join(ROOT, "hw2.py")) as f:
        script = f.read()
    assert render(os.path.join(ROOT, "hw2.ipynb")) == script, \
        "hw2.ipynb and hw2.py differ: run `make sync` and commit both"


def test_drift_is_detected(tmp_path):
    # The same comparison must fail when one side changes: edit a copy of the notebook.
    import nbformat
    nb = nbformat.read(os.path.join(ROOT, "hw2.ipynb"), as_version=4)
    nb.cells[1].source += "\n# drift"
    copy = tmp_path / "hw2.ipynb"
    nbformat.write(nb, str(copy))
    with open(os.path.join(ROOT, "hw2.py")) as f:
        assert render(str(copy)) != f.read()


def test_header_has_no_version_stamp():
    with open(os.path.join(ROOT, "hw2.py")) as f:
        head = f.read(2000)
    assert "jupytext_version:" not in head  # the stamp itself; the filter line names it
    assert "cell_metadata_filter: tags,-all" in head
