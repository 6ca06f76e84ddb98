"""Checkpoints: save, find the latest, load; mirrored to S3 so a replacement instance can resume.

A checkpoint is a directory ``step-00000123/`` holding ``state.pt`` (model, optimizer,
scheduler, grad scaler, RNG states, step, epoch and data position) and ``COMPLETE``, written
last. A directory without ``COMPLETE`` is a checkpoint that was being written when the process
died; it is ignored. Locally it is written as ``.tmp-step-…`` and renamed, so the marker and the
rename make the write atomic. In S3 the same files go under ``<prefix>/step-00000123/``,
``COMPLETE`` last.

The training loop decides *when* (``should_checkpoint``, pure); this module only does the I/O.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"
STATE = "state.pt"


def should_checkpoint(step: int, every_steps: int, *, end_of_epoch: bool, stop_requested: bool) -> bool:
    """Whether to write a checkpoint after optimizer step ``step``.

    >>> should_checkpoint(20, 10, end_of_epoch=False, stop_requested=False)
    True
    >>> should_checkpoint(21, 10, end_of_epoch=False, stop_requested=False)
    False
    >>> should_checkpoint(21, 0, end_of_epoch=False, stop_requested=True)
    True
    """
    return stop_requested or end_of_epoch or (every_steps > 0 and step > 0 and step % every_steps == 0)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / MARKER).is_file() and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(root: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``."""
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / (".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    (tmp / MARKER).write_text(str(step))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict:
    import torch

    # weights_only=False: the state holds numpy/python RNG states, which only we wrote.
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, (prefix.rstrip("/") + "/") if prefix.strip("/") else ""


def mirror_to_s3(ckpt: Path, uri: str, s3_client, keep: int = 2) -> None:
    """Upload one checkpoint directory (marker last) and prune older ones in S3."""
    bucket, prefix = _split(uri)
    key = prefix + ckpt.name + "/"
    s3_client.upload_file(str(ckpt / STATE), bucket, key + STATE)
    s3_client.put_object(Bucket=bucket, Key=key + MARKER, Body=ckpt.name.encode())
    steps = s3_checkpoints(uri, s3_client)
    for _, old in steps[:-keep]:
        for k in (STATE, MARKER):
            s3_client.delete_object(Bucket=bucket, Key=prefix + old + "/" + k)


def s3_checkpoints(uri: str, s3_client) -> list[tuple[int, str]]:
    """Complete checkpoints (``COMPLETE`` present) under an S3 prefix, oldest first."""
    bucket, prefix = _split(uri)
    found = []
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            rest = o["Key"][len(prefix) :]
            name, _, leaf = rest.partition("/")
            m = _STEP_DIR.match(name)
            if m and leaf == MARKER:
                found.append((int(m.group(1)), name))
    return sorted(found)


def fetch_latest_from_s3(uri: str, local_root: str | os.PathLike, s3_client) -> Path | None:
    """Download the newest complete S3 checkpoint into ``local_root`` (if newer than any local one)."""
    remote = s3_checkpoints(uri, s3_client)
    if not remote:
        return None
    step, name = remote[-1]
    local = list_checkpoints(local_root)
    if local and local[-1][0] >= step:
        return local[-1][1]
    bucket, prefix = _split(uri)
    tmp = Path(local_root) / (".tmp-" + name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s3_client.download_file(bucket, prefix + name + "/" + STATE, str(tmp / STATE))
    (tmp / MARKER).write_text(str(step))
    final = Path(local_root) / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("fetched checkpoint %s from %s", name, uri)
    return final
