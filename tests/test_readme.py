"""Every ```python block of README.md runs on its own, as written (a subprocess per block)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"


def python_blocks(text: str) -> list[tuple[str, str]]:
  """``(id, code)`` of each ```python block; the id is the nearest heading above and an index."""
  blocks, heading, fence, code = [], "top", None, []
  for line in text.splitlines():
    stripped = line.strip()
    if fence is None:
      if stripped.startswith("```"):
        fence, code = stripped[3:].strip(), []
      elif re.match(r"#{1,6} ", line):
        heading = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
    elif stripped == "```":
      if fence == "python":
        blocks.append((f"{len(blocks)}-{heading}", "\n".join(code) + "\n"))
      fence = None
    else:
      code.append(line)
  return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 3, [name for name, _ in BLOCKS]


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path):
  script = tmp_path / "block.py"
  script.write_text(code)
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  )
  out = subprocess.run(
    [sys.executable, str(script)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  if out.returncode != 0:
    pytest.fail(
      f"README block exited {out.returncode}:\n{code}\n{out.stderr[-3000:]}", pytrace=False
    )
