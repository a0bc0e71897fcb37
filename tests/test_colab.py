"""The Colab notebook runs top to bottom (with its tiny settings, its Flax NNX cell too) from
outside the checkout and saves its plots; in a fresh runtime its first cell installs from a
source the user sets, and says so."""

import json
import os
import pathlib
import subprocess
import sys

NOTEBOOK = pathlib.Path(__file__).parent.parent / "colabs" / "efqat_quickstart.ipynb"


def _code_cells(notebook: pathlib.Path) -> list[str]:
  """The notebook's code cells, in order."""
  cells = json.loads(notebook.read_text())["cells"]
  return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_notebook_runs_top_to_bottom_and_saves_its_plots(tmp_path):
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(_code_cells(NOTEBOOK)))
  workdir = tmp_path / "work"
  env = dict(os.environ, EFQAT_COLAB_TINY="1", EFQAT_COLAB_WORKDIR=str(workdir), MPLBACKEND="Agg")
  out = subprocess.run(  # outside the checkout: only the installed package, as in Colab
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "qat  accuracy" in out.stdout and "lwpn rho=0.1" in out.stdout
  assert "NNX float" in out.stdout and "EfQAT cwpl rho=0.1" in out.stdout  # the NNX cell
  assert (workdir / "efqat_plots.png").stat().st_size > 10_000


def test_first_cell_in_a_fresh_runtime_asks_for_the_repository_url(tmp_path):
  """A Python without efqat_jax (a fresh Colab runtime) and the URL placeholder left as it is:
  one line naming REPO_URL, before pip is run."""
  install = _code_cells(NOTEBOOK)[0]
  assert 'REPO_URL = "https://github.com/<owner>/efqat_jax"' in install
  fresh = tmp_path / "fresh"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
  (tmp_path / "cell.py").write_text(install)
  out = subprocess.run(
    [str(fresh / "bin" / "python"), "-I", "cell.py"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1, out.stderr
  assert out.stderr.strip().splitlines() == [
    "set REPO_URL (or SOURCE) in the first cell to where efqat_jax installs from"
  ]
