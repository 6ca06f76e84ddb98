"""The model artifact's manifest: its schema and validation (pure, stdlib only).

An artifact is a directory (locally) or a prefix ``s3://<bucket>/models/<name>/<version>/``
holding the ONNX variants, the tokenizer files, ``config.json``, ``labels.json`` and
``manifest.json``. The manifest is written last: its arrival is what triggers a rollout.

This module is shared by the three sides that touch an artifact: the export pipeline writes
a manifest, the control plane validates one when it lands in S3, the inference server
validates one before loading. Hash checking of the files themselves lives in
``inference/artifact.py`` (it needs the bytes, which the control plane never reads).

Example::

    >>> m = validate_manifest({
    ...     "schema_version": 1, "name": "banking77", "version": "20261126-104500",
    ...     "base_model": "all-MiniLM-L6-v2", "task": "text-classification",
    ...     "labels": ["a", "b"], "max_seq_len": 128, "dataset_sha256": "0" * 64,
    ...     "metrics": {"accuracy": 0.9}, "created_at": "2026-11-26T10:45:00Z",
    ...     "code_version": "abc123", "tokenizer_files": ["tokenizer.json"],
    ...     "files": {"tokenizer.json": "2" * 64, "config.json": "3" * 64, "labels.json": "4" * 64},
    ...     "variants": {"fp32": {"file": "model.onnx", "sha256": "1" * 64, "size": 10,
    ...                           "precision": "fp32", "provider": "CPUExecutionProvider",
    ...                           "published": True}},
    ...     "parity": {}})
    >>> m["name"]
    'banking77'
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1
VARIANT_NAMES = ("fp32", "int8", "fp16")
PRECISIONS = {"fp32", "int8", "fp16"}
PROVIDERS = {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

REQUIRED = {
    "schema_version": int,
    "name": str,
    "version": str,
    "base_model": str,
    "task": str,
    "labels": list,
    "max_seq_len": int,
    "dataset_sha256": str,
    "metrics": dict,
    "created_at": str,
    "code_version": str,
    "tokenizer_files": list,
    "files": dict,
    "variants": dict,
    "parity": dict,
}


class ManifestError(ValueError):
    """A manifest that must not be published, recorded or loaded. ``problems`` lists each reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid manifest: " + "; ".join(problems))


def validate_manifest(doc: object) -> dict:
    """Return ``doc`` unchanged if it is a valid manifest, else raise ``ManifestError``
    naming every problem found (field paths, expected types)."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ManifestError([f"manifest must be a JSON object, got {type(doc).__name__}"])
    for key, typ in REQUIRED.items():
        if key not in doc:
            problems.append(f"missing field '{key}'")
        elif not isinstance(doc[key], typ) or (typ is int and isinstance(doc[key], bool)):
            problems.append(f"field '{key}' must be {typ.__name__}, got {type(doc[key]).__name__}")
    if problems:
        raise ManifestError(problems)

    if doc["schema_version"] != SCHEMA_VERSION:
        problems.append(
            f"schema_version {doc['schema_version']} is not supported (expected {SCHEMA_VERSION})"
        )
    if not _NAME_RE.match(doc["name"]):
        problems.append("field 'name' must match [a-z0-9][a-z0-9._-]{0,63}")
    if not _VERSION_RE.match(doc["version"]):
        problems.append("field 'version' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    labels = doc["labels"]
    if len(labels) < 2:
        problems.append("field 'labels' must hold at least 2 labels")
    if not all(isinstance(x, str) and x for x in labels):
        problems.append("field 'labels' must hold non-empty strings")
    elif len(set(labels)) != len(labels):
        problems.append("field 'labels' holds duplicates")
    if doc["max_seq_len"] <= 0:
        problems.append("field 'max_seq_len' must be positive")
    if not _SHA_RE.match(doc["dataset_sha256"]):
        problems.append("field 'dataset_sha256' must be 64 lowercase hex digits")
    for f in doc["tokenizer_files"]:
        if not isinstance(f, str) or not _FILE_RE.match(f):
            problems.append(f"tokenizer file {f!r} is not a plain file name")
        elif f not in doc["files"]:
            problems.append(f"tokenizer file {f!r} has no sha256 in 'files'")
    for f, sha in doc["files"].items():
        if not _FILE_RE.match(f):
            problems.append(f"files: {f!r} is not a plain file name")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            problems.append(f"files.{f} must be a sha256 (64 lowercase hex digits)")
    for f in ("config.json", "labels.json"):
        if f not in doc["files"]:
            problems.append(f"files: missing '{f}'")

    variants = doc["variants"]
    if not variants:
        problems.append("field 'variants' is empty")
    for vname, v in variants.items():
        where = f"variants.{vname}"
        if vname not in VARIANT_NAMES:
            problems.append(f"{where}: unknown variant (expected one of {', '.join(VARIANT_NAMES)})")
        if not isinstance(v, dict):
            problems.append(f"{where} must be an object")
            continue
        for key, typ in (
            ("file", str),
            ("sha256", str),
            ("size", int),
            ("precision", str),
            ("provider", str),
            ("published", bool),
        ):
            if key not in v:
                problems.append(f"{where}: missing field '{key}'")
            elif not isinstance(v[key], typ):
                problems.append(f"{where}.{key} must be {typ.__name__}")
        if isinstance(v.get("file"), str) and not _FILE_RE.match(v["file"]):
            problems.append(f"{where}.file {v['file']!r} is not a plain file name")
        if isinstance(v.get("sha256"), str) and not _SHA_RE.match(v["sha256"]):
            problems.append(f"{where}.sha256 must be 64 lowercase hex digits")
        if isinstance(v.get("precision"), str) and v["precision"] not in PRECISIONS:
            problems.append(f"{where}.precision must be one of {sorted(PRECISIONS)}")
        if isinstance(v.get("provider"), str) and v["provider"] not in PROVIDERS:
            problems.append(f"{where}.provider must be one of {sorted(PROVIDERS)}")
    if not problems and not any(v.get("published") for v in variants.values()):
        problems.append("no variant passed the parity gate ('published' is false for all)")
    if problems:
        raise ManifestError(problems)
    return doc


def published_variants(doc: dict) -> dict:
    """The variants that passed the parity gate, by name."""
    return {k: v for k, v in doc["variants"].items() if v.get("published")}


def artifact_files(doc: dict) -> dict[str, str]:
    """Every file a loadable artifact holds besides ``manifest.json``, with its sha256:
    the published variants' ONNX files, then the tokenizer, config and labels files.
    Unpublished variants are not listed: a publisher need not upload them."""
    files = {v["file"]: v["sha256"] for v in published_variants(doc).values()}
    files.update(doc["files"])
    return files
