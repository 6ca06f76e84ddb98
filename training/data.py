"""Training data: read CSV / JSONL files or JSONL shard folders, locally or from S3, and check them.

Inputs the worker accepts (``load_split``):

- a ``.csv`` file with a header row (text and label column names are configurable);
- a ``.jsonl`` file, one JSON object per line;
- a directory or an ``s3://`` prefix of ``*.jsonl`` shards, the output of the control plane's
  ``preprocess`` job: ``{"text": ..., "label": ...}`` per line, optionally ``"input_ids"``
  (already tokenized; used as-is, truncated to the model's max length).

Every problem is a ``DataError`` naming the file, the line (1-based, as an editor shows it) and
the problem: missing file or column, empty file, bytes that are not UTF-8, a row without text or
label, malformed JSON. ``label_set`` and ``check_dev_labels`` add the cross-split checks: one
class only, dev labels never seen in training.

Pure stdlib; S3 access goes through an injected boto3 client.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad training data. ``path``/``line`` point at the problem (``line`` is 1-based, None when
    the problem is the whole file)."""

    def __init__(self, path: str, problem: str, line: int | None = None):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Split:
    """One split's examples, in file order. ``input_ids`` is None unless every row had them."""

    source: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    lines: tuple[tuple[str, int], ...]  # (file, 1-based line) of each example, for error messages
    sha256: str  # of the bytes read (shards: of the sorted (name, sha256) list)
    input_ids: tuple[tuple[int, ...], ...] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.texts)


def _decode(path: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            path, f"bytes that are not UTF-8 at byte {e.start} ({raw[e.start : e.start + 4]!r})", line
        ) from e
    return text.removeprefix("\ufeff")


def _parse_csv(path: str, text: str, text_col: str, label_col: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, "empty file (no header row)") from None
    except csv.Error as e:
        raise DataError(path, f"malformed CSV: {e}", 1) from e
    header = [h.strip() for h in header]
    for col in (text_col, label_col):
        if col not in header:
            raise DataError(path, f"missing column '{col}' (header has: {', '.join(header)})", 1)
    ti, li = header.index(text_col), header.index(label_col)
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(path, f"{len(row)} fields, header has {len(header)}", line)
            rows.append((row[ti], row[li], None, line))
    except csv.Error as e:
        raise DataError(path, f"malformed CSV: {e}", reader.line_num) from e
    return rows


def _parse_jsonl(path: str, text: str, text_col: str, label_col: str):
    rows = []
    for n, raw_line in enumerate(text.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            obj = json.loads(raw_line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg}", n) from e
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", n)
        for col in (text_col, label_col):
            if col not in obj:
                raise DataError(path, f"missing field '{col}'", n)
        ids = obj.get("input_ids")
        if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)):
            raise DataError(path, "'input_ids' must be a non-empty list of integers", n)
        rows.append((obj[text_col], obj[label_col], ids, n))
    return rows


def _rows_from_file(path: str, raw: bytes, text_col: str, label_col: str):
    text = _decode(path, raw)
    if not text.strip():
        raise DataError(path, "empty file")
    lower = path.lower()
    if lower.endswith(".csv"):
        rows = _parse_csv(path, text, text_col, label_col)
    elif lower.endswith((".jsonl", ".json", ".ndjson")):
        rows = _parse_jsonl(path, text, text_col, label_col)
    else:
        raise DataError(path, "unknown format: expected .csv or .jsonl (or a folder of .jsonl shards)")
    if not rows:
        raise DataError(path, "no examples (only a header or blank lines)")
    for text_v, label_v, _, line in rows:
        if not isinstance(text_v, str) or not text_v.strip():
            raise DataError(path, f"empty or non-string text in column '{text_col}'", line)
        if (
            label_v is None
            or (isinstance(label_v, str) and not label_v.strip())
            or isinstance(label_v, bool | dict | list)
        ):
            raise DataError(path, f"missing label in column '{label_col}'", line)
    return rows


def _list_source(uri: str, s3_client) -> list[tuple[str, bytes]]:
    """(display path, bytes) for each file a source names, shards sorted by name."""
    if uri.startswith("s3://"):
        if s3_client is None:
            import boto3  # lazily: clients made before moto starts are not intercepted

            s3_client = boto3.client("s3")
        bucket, _, key = uri[5:].partition("/")
        if not key or key.endswith("/"):
            keys = []
            for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".jsonl")]
            if not keys:
                raise DataError(uri, "no .jsonl shards under this prefix (missing data)")
            keys.sort()
        else:
            keys = [key]
        out = []
        for k in keys:
            try:
                body = s3_client.get_object(Bucket=bucket, Key=k)["Body"].read()
            except Exception as e:
                raise DataError(f"s3://{bucket}/{k}", f"cannot read: {e}") from e
            out.append((f"s3://{bucket}/{k}", body))
        return out
    p = Path(uri)
    if p.is_dir():
        shards = sorted(p.glob("*.jsonl"))
        if not shards:
            raise DataError(uri, "directory holds no .jsonl shards")
        return [(str(s), s.read_bytes()) for s in shards]
    if not p.exists():
        raise DataError(uri, "file not found")
    return [(str(p), p.read_bytes())]


def load_split(uri: str, text_col: str = "text", label_col: str = "label", s3_client=None) -> Split:
    """Read and check one split. Labels are kept as strings (JSON ints become "3")."""
    files = _list_source(os.fspath(uri), s3_client)
    texts, labels, ids, lines = [], [], [], []
    shas = []
    for path, raw in files:
        shas.append((Path(path).name, hashlib.sha256(raw).hexdigest()))
        for t, y, i, line in _rows_from_file(path, raw, text_col, label_col):
            texts.append(t)
            labels.append(str(y).strip())
            ids.append(i)
            lines.append((path, line))
    if len(files) == 1:
        sha = shas[0][1]
    else:
        sha = hashlib.sha256(json.dumps(shas).encode()).hexdigest()
    all_ids = tuple(tuple(i) for i in ids) if all(i is not None for i in ids) else None
    return Split(str(uri), tuple(texts), tuple(labels), tuple(lines), sha, all_ids)


def label_set(train: Split) -> list[str]:
    """The sorted label names of the training split (index = class id); needs at least 2."""
    names = sorted(set(train.labels))
    if len(names) < 2:
        raise DataError(train.source, f"label column has a single class ({names[0]!r}): nothing to learn")
    return names


def check_dev_labels(dev: Split, labels: list[str]) -> None:
    """Every dev label must be one the model can predict."""
    known = set(labels)
    for y, (path, line) in zip(dev.labels, dev.lines, strict=True):
        if y not in known:
            raise DataError(path, f"label {y!r} does not occur in the training data", line)


def dataset_sha256(*splits: Split) -> str:
    """One hash naming the data a model was trained (and evaluated) on."""
    if len(splits) == 1:
        return splits[0].sha256
    return hashlib.sha256("\n".join(s.sha256 for s in splits).encode()).hexdigest()


def download_prefix(uri: str, dest: str | None = None, s3_client=None) -> Path:
    """Copy an S3 prefix to a local directory (used to fetch a checkpoint to resume from)."""
    if s3_client is None:
        import boto3

        s3_client = boto3.client("s3")
    bucket, _, prefix = uri[5:].partition("/")
    prefix = prefix.rstrip("/") + "/"
    root = Path(dest or tempfile.mkdtemp(prefix="nlpfleet-s3-"))
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            target = root / o["Key"][len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3_client.download_file(bucket, o["Key"], str(target))
    return root
