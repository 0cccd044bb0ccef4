"""Document readers for the embedded default corpus and local/remote files.

A reader yields `(doc_id, text)` in a fixed order. The train/validation split of a corpus without
its own splits is decided per document by a hash of its id, so the two never share a document and
the split does not depend on the order, the file count, or the process reading it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

from recurrentgemma_tpu import gcs
from recurrentgemma_tpu.data.config import SourceConfig

# Stdlib directories that are not the library itself: third-party installs, bundled test data
# (deliberately malformed and non-UTF-8 files) and vendored wheels.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "ensurepip"}
)

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)


class CorpusError(ValueError):
  """A source cannot be read: missing, empty, unreadable or non-UTF-8 data (names the file)."""


def in_validation(doc_id: str, fraction: float) -> bool:
  """Whether a document is held out; a pure function of its id, stable across machines."""
  if fraction <= 0.0:
    return False
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


def default_root(source: SourceConfig) -> str:
  return source.default_root or sysconfig.get_paths()["stdlib"]


def default_files(source: SourceConfig) -> list[str]:
  """Relative paths of the embedded corpus's documents, sorted so every machine agrees."""
  root = default_root(source)
  if not os.path.isdir(root):
    raise CorpusError(f"default corpus directory {root!r} (config default_root) does not exist.")
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
    for f in filenames:
      if f.endswith(".py"):
        found.append(os.path.relpath(os.path.join(dirpath, f), root))
  found.sort()
  if not found:
    raise CorpusError(f"default corpus directory {root!r} contains no *.py files.")
  return found


def default_fingerprint(source: SourceConfig) -> str:
  """Identity of the embedded corpus: interpreter version plus every file's content."""
  root = default_root(source)
  h = hashlib.sha256(sys.version.encode())
  for rel in default_files(source):
    h.update(rel.encode() + b"\0")
    with open(os.path.join(root, rel), "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def read_default(source: SourceConfig, split: str) -> Iterator[tuple[str, str]]:
  """The embedded corpus: one document per stdlib module source file.

  Files that are not UTF-8 are skipped (a few stdlib modules use legacy encodings on purpose);
  this is deterministic, since the file set is part of the fingerprint.
  """
  root = default_root(source)
  for rel in default_files(source):
    if in_validation(rel, source.validation_fraction) != (split == VALIDATION):
      continue
    with open(os.path.join(root, rel), "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue
    if text.strip():
      yield rel, text


def _before_wildcard(glob: str) -> str:
  return glob[:min((i for i, c in enumerate(glob) if c in "*?["), default=len(glob))]


def _glob_root(glob: str) -> str:
  """The directory part of a glob before its first wildcard."""
  return _before_wildcard(glob).rpartition("/")[0]


def _matches(path: str, glob: str) -> bool:
  """fnmatch one path segment at a time: `*` stays within a directory, as in tf.io.gfile.glob."""
  parts, globs = path.split("/"), glob.split("/")
  return len(parts) == len(globs) and all(map(fnmatch.fnmatchcase, parts, globs))


def _glob(glob: str) -> list[str]:
  """Files matching one glob: gs:// through the storage client (gcs.py), else tf.io.gfile."""
  if gcs.is_gcs(glob):
    return sorted(p for p in gcs.list_objects(_before_wildcard(glob)) if _matches(p, glob))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return [m for m in tf.io.gfile.glob(glob) if not tf.io.gfile.isdir(m)]


def expand_globs_with_ids(pattern: str, what: str) -> dict[str, str]:
  """Matches of comma-separated globs -> document-id prefix, in sorted path order.

  The id is the path relative to the glob's fixed directory, so the train/validation split of a
  corpus does not change when it is mounted or copied somewhere else.
  """
  files: dict[str, str] = {}
  for glob in (p.strip() for p in pattern.split(",")):
    if not glob:
      continue
    matches = _glob(glob)
    if not matches:
      raise CorpusError(f"{what}: no file matches {glob!r}; give an existing file or a glob that "
                        "matches files (tf.io.gfile syntax, e.g. '/data/*.txt' or 'gs://bucket/d/*.jsonl').")
    root = _glob_root(glob)
    for m in matches:
      files.setdefault(m, m[len(root):].lstrip("/") if root and m.startswith(root) else m)
  if not files:
    raise CorpusError(f"{what}: {pattern!r} matches only directories.")
  return dict(sorted(files.items()))


def expand_globs(pattern: str, what: str) -> list[str]:
  """Sorted matches of comma-separated globs; errors name the glob that matched nothing."""
  return list(expand_globs_with_ids(pattern, what))


def files_fingerprint(files: list[str]) -> str:
  """Identity of a file set: names, sizes and modification times (object generations on gs://;
  contents are not re-read)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  listed: dict[str, dict[str, tuple[int, int]]] = {}  # one listing per gs:// directory
  for path in files:
    if gcs.is_gcs(path):
      directory = path.rpartition("/")[0] + "/"
      if directory not in listed:
        listed[directory] = gcs.list_objects(directory)
      size, generation = listed[directory][path]
      h.update(f"{path}\0{size}\0{generation}\0".encode())
      continue
    st = tf.io.gfile.stat(path)
    h.update(f"{path}\0{st.length}\0{st.mtime_nsec}\0".encode())
  return h.hexdigest()


def _decode(raw: bytes, path: str, record: int | None) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    where = path if record is None else f"{path} (record {record})"
    raise CorpusError(f"{where} is not valid UTF-8 at byte {e.start}: {e.reason}.") from None


def _read_bytes(path: str) -> bytes:
  if gcs.is_gcs(path):
    data = gcs.read_bytes(path)
    if data is None:
      raise CorpusError(f"cannot read {path}: the object does not exist.")
    return data
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.OpError as e:
    raise CorpusError(f"cannot read {path}: {e.message}") from None


def _records(path: str, fmt: str, text_key: str) -> Iterator[tuple[int, str]]:
  """(record index, text) of one file."""
  if fmt == "text":
    yield 0, _decode(_read_bytes(path), path, None)
  elif fmt in ("lines", "jsonl"):
    for i, line in enumerate(_read_bytes(path).split(b"\n")):
      if not line.strip():
        continue
      text = _decode(line, path, i)
      if fmt == "jsonl":
        try:
          obj = json.loads(text)
        except json.JSONDecodeError as e:
          raise CorpusError(f"{path} (line {i + 1}) is not valid JSON: {e.msg}.") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
          raise CorpusError(f"{path} (line {i + 1}) has no string field {text_key!r}.")
        text = obj[text_key]
      yield i, text
  elif fmt == "tfrecord":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    i = -1
    try:
      for i, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        example = tf.train.Example.FromString(raw)
        feature = example.features.feature.get(text_key)
        if feature is None or not feature.bytes_list.value:
          raise CorpusError(f"{path} (record {i}) has no bytes feature {text_key!r}.")
        yield i, _decode(feature.bytes_list.value[0], path, i)
    except tf.errors.OpError as e:
      raise CorpusError(f"cannot read {path} after record {i}: {e.message}") from None
  elif fmt == "parquet":
    yield from _parquet_records(path, text_key)
  else:
    raise ValueError(f"format={fmt!r}; valid: text, lines, jsonl, tfrecord, parquet.")


def _parquet_records(path: str, text_key: str) -> Iterator[tuple[int, str]]:
  """(row index, text) of the `text_key` column of a Parquet file, one row group at a time."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    with (gcs.open_read(path) if gcs.is_gcs(path) else open(path, "rb")) as f:
      parquet = pq.ParquetFile(f)
      names = parquet.schema_arrow.names
      if text_key not in names:
        raise CorpusError(f"{path} has no column {text_key!r} (config text_key); its columns: "
                          f"{names}.")
      field = parquet.schema_arrow.field(text_key)
      if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise CorpusError(f"{path}: column {text_key!r} is {field.type}, not a string column.")
      i = 0
      for group in range(parquet.num_row_groups):
        for text in parquet.read_row_group(group, columns=[text_key]).column(0).to_pylist():
          if text is not None:
            yield i, text
          i += 1
  except (pa.ArrowException, OSError) as e:
    raise CorpusError(f"cannot read {path} as Parquet: {e}") from None


def read_files(source: SourceConfig, split: str) -> Iterator[tuple[str, str]]:
  """Documents of a `files` source for one split."""
  where = f"config.data.sources.{source.name}"
  if split == VALIDATION and source.eval_pattern:
    files, holdout = expand_globs_with_ids(source.eval_pattern, f"{where}.eval_pattern"), None
  else:
    files = expand_globs_with_ids(source.pattern, f"{where}.pattern")
    holdout = None if source.eval_pattern else source.validation_fraction
    if source.eval_pattern:
      overlap = set(files) & set(expand_globs(source.eval_pattern, "eval_pattern"))
      if overlap:
        raise CorpusError(f"{where}: files in both pattern and eval_pattern, e.g. "
                          f"{sorted(overlap)[0]}; an eval split must not overlap train.")
  for path, file_id in files.items():
    for i, text in _records(path, source.format, source.text_key):
      doc_id = f"{file_id}#{i}"
      if holdout is not None and in_validation(doc_id, holdout) != (split == VALIDATION):
        continue
      if text.strip():
        yield doc_id, text
