"""Hand-off from training to export (and optionally publish): the whole job a fine-tune runs.

``train_and_export(config, ExportSpec(...))`` trains, exports ``<output_dir>/model`` to the
artifact directory ``<output_dir>/artifact`` behind the parity gate (held-out texts: the dev
split), and publishes to S3 (manifest last) when ``publish_uri`` is given. Only rank 0 exports.

Example::

    out = train_and_export(TrainConfig(train="train.csv", dev="dev.csv", output_dir="run"),
                           ExportSpec(name="banking77", publish_uri="s3://b/models/banking77/v1/"))
    out["manifest"]["variants"]["int8"]["published"]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from training.config import TrainConfig


@dataclass(frozen=True)
class ExportSpec:
    name: str
    version: str | None = None  # default: UTC timestamp, e.g. 20261126-104500
    publish_uri: str | None = None
    artifact_dir: str | None = None  # default: <output_dir>/artifact
    variants: tuple[str, ...] = ("fp32", "int8", "fp16")


def default_version(now: datetime) -> str:
    """>>> default_version(datetime(2026, 11, 26, 10, 45, 0))
    '20261126-104500'
    """
    return now.strftime("%Y%m%d-%H%M%S")


def train_and_export(
    config: TrainConfig,
    spec: ExportSpec,
    progress: Callable[[dict], None] | None = None,
    *,
    s3_client=None,
) -> dict:
    """Returns ``{"train": TrainResult dict, "manifest": dict | None, "artifact_dir", "uri"}``."""
    from inference.export import export_model
    from training.worker import train

    result = train(config, progress, s3_client=s3_client)
    out = {"train": result.to_dict(), "manifest": None, "artifact_dir": None, "uri": None}
    if result.status != "completed" or result.model_dir is None:
        return out  # interrupted, or a non-zero rank: nothing to export
    artifact_dir = Path(spec.artifact_dir or Path(config.output_dir) / "artifact")
    version = spec.version or default_version(datetime.now(UTC))
    manifest = export_model(
        result.model_dir,
        artifact_dir,
        name=spec.name,
        version=version,
        labels=result.labels,
        heldout_texts=result.heldout_texts,
        heldout_labels=result.heldout_labels,
        dataset_sha256=result.dataset_sha256,
        metrics={**result.metrics, "train_time_s": result.train_time_s, "steps": result.steps},
        max_seq_len=config.max_seq_len,
        base_model=result.base_model,
        variants=spec.variants,
    )
    if progress:
        progress({"event": "exported", "artifact_dir": str(artifact_dir), "version": version})
    out.update(manifest=manifest, artifact_dir=str(artifact_dir))
    if spec.publish_uri:
        from inference.artifact import publish_artifact

        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        publish_artifact(artifact_dir, spec.publish_uri, s3_client)
        out["uri"] = spec.publish_uri
        if progress:
            progress({"event": "published", "uri": spec.publish_uri})
    return out
