"""``results.json``: each finished stage's result, sealed by a digest of its own values.

A result that was edited (or damaged) no longer matches its digest and is refused, so a changed
number is never reported as the run's. An entry may be deleted: its stage then runs again and
records its result anew (from its checkpoints, when they are there).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from efqat_jax.errors import WorkdirError
from efqat_jax.pipeline.outputs import sha256, write_json

DIGEST = "digest"


def _digest(result: dict[str, Any]) -> str:
  """sha256 of the canonical JSON of ``result`` without its digest."""
  values = {k: v for k, v in result.items() if k != DIGEST}
  return sha256(json.dumps(values, sort_keys=True, allow_nan=False).encode())


def seal(result: dict[str, Any]) -> dict[str, Any]:
  """``result`` as it reads back from JSON, with its digest."""
  result = json.loads(json.dumps({k: v for k, v in result.items() if k != DIGEST}))
  return {**result, DIGEST: _digest(result)}


def read(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The results in ``path`` (``{}`` if there is none yet), every entry checked against its
  digest.

  Raises:
    WorkdirError: the file is not a results file, or an entry does not match its digest.
  """
  if not path.exists():
    return {}
  try:
    results = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    reason = f"not UTF-8 JSON: {error}".splitlines()[0]
    raise WorkdirError(
      f"{path} is damaged ({reason}); move it away to record every stage's result again"
      " (each is recomputed from its checkpoints)"
    ) from None
  if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()):
    raise WorkdirError(
      f"{path} is damaged (not a mapping of stage to result); move it away to record every"
      " stage's result again (each is recomputed from its checkpoints)"
    )
  for stage, result in results.items():
    if DIGEST not in result:
      why = "has no digest (an older version wrote it, or it was edited)"
    elif result[DIGEST] != _digest(result):
      why = "was changed after the run wrote it (it does not match its digest)"
    else:
      continue
    raise WorkdirError(
      f"{path}: the result of {stage!r} {why}; delete that entry to compute it again"
    )
  return results


def write(path: pathlib.Path, results: dict[str, dict[str, Any]]) -> None:
  """Writes the (sealed) results atomically, as strict JSON."""
  write_json(path, results)
