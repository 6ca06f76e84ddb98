"""Model artifacts on disk and in S3: verify, publish, fetch.

An artifact is a directory holding the ONNX variants, tokenizer files, ``config.json``,
``labels.json`` and ``manifest.json`` (schema: ``chalicelib/manifest.py``). This module is the
only place that reads an artifact's bytes to check them against the manifest:

- ``verify_artifact(dir)`` checks every file the manifest lists (sha256 and, for variants, size)
  and returns the manifest; any mismatch raises ``ArtifactError``.
- ``publish_artifact(dir, uri, s3)`` verifies, then uploads every listed file and
  ``manifest.json`` *last*: the manifest's arrival in S3 is what triggers a rollout, so a reader
  that sees it can rely on every other file being there already.
- ``fetch_artifact(uri, dest, s3)`` downloads the manifest, then each listed file, and verifies.

Stdlib + an injected boto3 S3 client only (no torch/numpy): the inference agent and the
batch job use it too.

Example::

    manifest = verify_artifact("out/banking77")
    publish_artifact("out/banking77", "s3://bucket/models/banking77/v1/", s3)
    local = fetch_artifact("s3://bucket/models/banking77/v1/", "/var/lib/nlpfleet/m", s3)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from chalicelib.manifest import ManifestError, artifact_files, published_variants, validate_manifest

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact that must not be loaded or published (missing file, hash or size mismatch,
    invalid manifest, bad URI, S3 failure). The message names the file and the problem."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, streamed (ONNX files can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b/")``; the prefix always ends with ``/``.

    >>> parse_s3_uri("s3://b/models/m/1")
    ('b', 'models/m/1/')
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ArtifactError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket or not prefix.strip("/"):
        raise ArtifactError(f"S3 URI needs a bucket and a prefix: {uri!r}")
    return bucket, prefix.rstrip("/") + "/"


def load_manifest(artifact_dir: str | os.PathLike) -> dict:
    """Read and schema-validate ``manifest.json`` of a local artifact directory."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest.json is missing (an artifact without one is incomplete)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from e
    try:
        return validate_manifest(doc)
    except ManifestError as e:
        raise ArtifactError(f"{path}: {e}") from e


def _check_files(root: Path, doc: dict) -> None:
    sizes = {v["file"]: v["size"] for v in published_variants(doc).values()}
    problems = []
    for name, expected in artifact_files(doc).items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if name in sizes and path.stat().st_size != sizes[name]:
            problems.append(f"{name}: size {path.stat().st_size} != manifest {sizes[name]}")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(f"{name}: sha256 {actual} != manifest {expected}")
    if problems:
        raise ArtifactError(f"artifact {root} fails verification: " + "; ".join(problems))


def verify_artifact(artifact_dir: str | os.PathLike) -> dict:
    """Check every file the manifest lists against its sha256 (and variant size); return the
    manifest. Raises ``ArtifactError`` naming each missing or mismatching file."""
    root = Path(artifact_dir)
    doc = load_manifest(root)
    _check_files(root, doc)
    return doc


def publish_artifact(artifact_dir: str | os.PathLike, uri: str, s3_client) -> dict:
    """Upload a verified artifact to ``s3://bucket/models/<name>/<version>/``; ``manifest.json``
    goes last. Returns the manifest. Unpublished variants are not uploaded."""
    bucket, prefix = parse_s3_uri(uri)
    root = Path(artifact_dir)
    doc = verify_artifact(root)
    try:
        for name in artifact_files(doc):
            s3_client.upload_file(str(root / name), bucket, prefix + name)
        # Last, and as a single PUT: its Object Created event starts the rollout.
        s3_client.put_object(
            Bucket=bucket,
            Key=prefix + MANIFEST,
            Body=(root / MANIFEST).read_bytes(),
            ContentType="application/json",
        )
    except Exception as e:  # botocore errors become domain errors at this edge
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"publishing {root} to {uri} failed: {e}") from e
    return doc


def fetch_artifact(uri: str, dest_dir: str | os.PathLike, s3_client) -> Path:
    """Download the artifact at ``uri`` into ``dest_dir`` and verify it; return ``dest_dir``.
    The manifest is read first (it names every file and hash) and written to disk last, so a
    half-fetched directory never looks complete."""
    bucket, prefix = parse_s3_uri(uri)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        raw = s3_client.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read()
    except Exception as e:
        raise ArtifactError(f"{uri}{MANIFEST}: cannot read manifest: {e}") from e
    try:
        doc = validate_manifest(json.loads(raw))
    except (ValueError, ManifestError) as e:
        raise ArtifactError(f"{uri}{MANIFEST}: {e}") from e
    stale = dest / MANIFEST
    if stale.exists():
        stale.unlink()
    for name in artifact_files(doc):
        try:
            s3_client.download_file(bucket, prefix + name, str(dest / name))
        except Exception as e:
            raise ArtifactError(f"{uri}{name}: download failed: {e}") from e
    _check_files(dest, doc)  # before the manifest lands: a refused fetch never looks complete
    tmp = dest / (MANIFEST + ".part")
    tmp.write_bytes(raw)
    os.replace(tmp, dest / MANIFEST)
    return dest
