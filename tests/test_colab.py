"""The Colab notebook runs top to bottom (with its tiny settings) and saves its plots."""

import json
import os
import pathlib
import subprocess
import sys

NOTEBOOK = pathlib.Path(__file__).parent.parent / "colabs" / "efqat_quickstart.ipynb"


def _script(notebook: pathlib.Path) -> str:
  """The notebook's code cells, in order, as one script."""
  cells = json.loads(notebook.read_text())["cells"]
  return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_notebook_runs_top_to_bottom_and_saves_its_plots(tmp_path):
  script = tmp_path / "notebook.py"
  script.write_text(_script(NOTEBOOK))
  workdir = tmp_path / "work"
  env = dict(os.environ, EFQAT_COLAB_TINY="1", EFQAT_COLAB_WORKDIR=str(workdir), MPLBACKEND="Agg")
  out = subprocess.run(
    [sys.executable, str(script)],
    cwd=NOTEBOOK.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "qat  accuracy" in out.stdout and "lwpn rho=0.1" in out.stdout
  assert (workdir / "efqat_plots.png").stat().st_size > 10_000
