"""README.md as a user meets it: every ```python block runs on its own, as written (a subprocess
per block); its contents links, config fields, library names and paths exist; it cites papers,
not notes outside the repository; its result summaries quote bench/README.md."""

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from efqat_jax.fields import Field, lookup
from efqat_jax.pipeline import pipeline_schema

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"
BENCH_README = ROOT / "bench" / "README.md"
SUMMARY_MARK = "<!-- summary of bench/README.md -->"


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


def prose(text: str) -> str:
  """``text`` without its fenced code blocks."""
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def headings(text: str) -> list[tuple[int, str]]:
  """``(level, title)`` of each markdown heading outside code blocks."""
  return [
    (len(m.group(1)), m.group(2).strip())
    for m in re.finditer(r"^(#{1,6}) (.+)$", prose(text), flags=re.M)
  ]


def github_anchor(title: str) -> str:
  """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped (letters,
  digits, ``_`` and ``-`` kept), spaces turned into ``-``."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "").strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
  """Every heading's anchor (a repeated one gets ``-1``, ``-2``, ... as on GitHub)."""
  found, counts = set(), {}
  for _, title in headings(text):
    base = github_anchor(title)
    count = counts.get(base, 0)
    counts[base] = count + 1
    found.add(f"{base}-{count}" if count else base)
  return found


def links(text: str) -> list[str]:
  """Targets of the markdown links outside code blocks."""
  return re.findall(r"\]\(([^)\s]+)\)", prose(text))


def code_spans(text: str) -> list[str]:
  return re.findall(r"`([^`\n]+)`", prose(text))


README_TEXT = README.read_text()
BENCH_TEXT = BENCH_README.read_text()
BLOCKS = python_blocks(README_TEXT)


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


def test_github_anchor_matches_github():
  assert github_anchor("Layer-wise PTQ: OPTQ, GPFQ and accumulator-aware AXE") == (
    "layer-wise-ptq-optq-gpfq-and-accumulator-aware-axe"
  )
  assert github_anchor("Fake quantization (`python bench/x_y.py`)") == (
    "fake-quantization-python-benchx_ypy"
  )
  assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_readme_contents_lists_every_section_and_every_anchor_resolves():
  sections = [title for level, title in headings(README_TEXT) if level == 2]
  assert "Contents" in sections, "README has no table of contents"
  contents = README_TEXT.split("## Contents", 1)[1].split("\n## ", 1)[0]
  listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
  missing = [s for s in sections if s != "Contents" and github_anchor(s) not in listed]
  assert not missing, f"sections not in the contents: {missing}"
  targets = {README: anchors(README_TEXT), BENCH_README: anchors(BENCH_TEXT)}
  for page, text in ((README, README_TEXT), (BENCH_README, BENCH_TEXT)):
    for link in links(text):
      if link.startswith(("http://", "https://")):
        continue
      path, _, anchor = link.partition("#")
      target = (page.parent / path).resolve() if path else page
      assert target.exists(), f"{page.name} links to {link}, which does not exist"
      if anchor:
        assert anchor in targets.get(target, set()), f"{page.name}: no heading for {link}"


def test_readme_cites_papers_not_notes_outside_the_repository():
  for page, text in ((README, README_TEXT), (BENCH_README, BENCH_TEXT)):
    for note in ("research/", "../shared", "methods.md", "DESIGN.md"):
      assert note not in text, f"{page.name} cites {note}, which users do not have"
  for arxiv in ("2411.11038", "2210.17323", "2010.15979", "2409.17092", "2207.03088", "2412.15846"):
    assert f"arxiv.org/abs/{arxiv}" in README_TEXT


def _resolves(dotted: str) -> bool:
  """Whether ``dotted`` (e.g. ``efqat_jax.nn.quantized_layers``) can be imported or reached."""
  parts = dotted.split(".")
  obj = importlib.import_module(parts[0])
  for i, name in enumerate(parts[1:], start=2):
    if hasattr(obj, name):
      obj = getattr(obj, name)
      continue
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      return False
  return True


def _is_library_name(dotted: str) -> bool:
  """Whether ``dotted`` (e.g. ``efqat.restrict_backward``) names something in efqat_jax."""
  return _resolves(f"efqat_jax.{dotted}")


def config_mentions(text: str, schema: dict) -> set[str]:
  """Dotted config paths that ``text`` names: ``config.x.y`` and ``--config.x.y=`` anywhere, and
  ``block.field`` in inline code where ``block`` is a config block (not a library name)."""
  found = set(re.findall(r"--config\.([\w.]+)=", text))
  blocks = {name for name, item in schema.items() if isinstance(item, dict)}
  for span in code_spans(text):
    for token in re.split(r"[\s=,()]+", span):
      token = token.removeprefix("--")
      if re.fullmatch(r"config(\.\w+)+", token):
        found.add(token.removeprefix("config."))
      elif (
        re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", token)
        and token.split(".")[0] in blocks
        and not _is_library_name(token)
      ):
        found.add(token)
  return found


def field_tables(text: str) -> list[tuple[str, list[str]]]:
  """``(block, names)`` of each table headed "`block` field": the names its rows describe."""
  tables = []
  for match in re.finditer(r"^\| `([\w.]+)` field \|.*\n\|[-| ]+\|\n((?:\|.*\n)+)", text, re.M):
    rows = match.group(2).splitlines()
    names = [n for row in rows for n in re.findall(r"`([\w.]+)`", row.split("|")[1])]
    tables.append((match.group(1), names))
  return tables


def test_readme_config_fields_exist():
  schema = pipeline_schema()
  mentions = config_mentions(README_TEXT, schema)
  assert {"ptq.axe_gpfq.accumulator_bits", "ptq.method", "efqat.rho"} <= mentions
  wrong = sorted(m for m in mentions if lookup(schema, m) is None)
  assert not wrong, f"README names config fields that do not exist: {wrong}"
  tables = field_tables(README_TEXT)
  assert {block for block, _ in tables} >= {"ptq.attention_round", "block_replacement"}
  for block, names in tables:
    wrong = [n for n in names if not isinstance(lookup(schema, f"{block}.{n}"), Field)]
    assert not wrong, f"the {block} table names fields it does not have: {wrong}"


def test_config_mentions_catch_a_wrong_name():
  schema = pipeline_schema()
  text = "Set `ptq.axe.accumulator_bits` or `config.efqat.rhoo`, with `efqat.restrict_backward`."
  assert config_mentions(text, schema) == {"ptq.axe.accumulator_bits", "efqat.rhoo"}


def test_readme_library_names_and_paths_exist():
  for span in code_spans(README_TEXT):
    for name in re.findall(r"\befqat_jax(?:\.\w+)+", span):
      assert _resolves(name), f"README names {name}, which does not exist"
    for token in span.split():
      if re.match(r"(efqat_jax|bench|configs|colabs|tests|\.ci)/", token) and "<" not in token:
        assert (ROOT / token.rstrip(".,;:")).exists(), f"README names {token}: no such path"


def summary_tables(text: str) -> list[list[list[str]]]:
  """The body rows (as cells) of each table marked as a summary of bench/README.md."""
  tables = []
  for part in text.split(SUMMARY_MARK)[1:]:
    rows = []
    for line in part.lstrip("\n").splitlines():
      if not line.startswith("|"):
        break
      rows.append([cell.strip() for cell in line.strip("|").split("|")])
    tables.append(rows[2:])
  return tables


def test_readme_summaries_quote_the_bench_figures_verbatim():
  tables = summary_tables(README_TEXT)
  assert len(tables) >= 5, "one summary table per method: EfQAT speed, accuracy, AXE, AR, BR"
  bench = BENCH_TEXT.replace("**", "")
  for rows in tables:
    assert rows
    for cell in (cell.replace("**", "") for row in rows for cell in row):
      if re.match(r"\d", cell):
        assert cell in bench, f"README's summary figure {cell!r} is not in bench/README.md"
