"""Training configuration: one frozen dataclass, built from a dict (job spec, tests) or argv (CLI).

Units are in the names (``max_seq_len``, ``checkpoint_every_steps``, ``heartbeat_s``). Unknown or
invalid keys fail fast with ``ConfigError`` naming the key.

Example::

    >>> c = TrainConfig.from_dict({"train": "train.csv", "output_dir": "out", "epochs": 2})
    >>> c.epochs, c.lr
    (2, 0.0001)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """An invalid training configuration; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    train: str
    output_dir: str
    dev: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    model_dir: str | None = None  # any local HF BERT-family checkpoint; None: the packaged MiniLM
    max_seq_len: int = 64
    batch_size: int = 32  # per process, per micro-batch
    grad_accum_steps: int = 1
    epochs: int = 3
    max_steps: int | None = None  # caps optimizer steps (quick runs, tests)
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    train_limit: int | None = None  # first N training rows (slices for tests / quick demos)
    dev_limit: int | None = None
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU; or "no", "bf16", "fp16"
    checkpoint_dir: str | None = None  # default: <output_dir>/checkpoints
    checkpoint_every_steps: int = 0  # 0: only on SIGTERM and at epoch ends
    checkpoint_s3_uri: str | None = None  # mirror of checkpoint_dir, s3://bucket/prefix/
    keep_checkpoints: int = 2
    resume: bool = True  # resume from the latest checkpoint if one exists
    eval_batch_size: int = 64
    log_every_steps: int = 10
    heartbeat_s: float = 30.0
    progress_bar: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    # Freeze the word-embedding matrix (half of MiniLM's weights): on CPU it halves the optimizer
    # step and costs little accuracy on small classification sets.
    freeze_embeddings: bool = False

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"config '{key}': {why}")

        for key in (
            "max_seq_len",
            "batch_size",
            "grad_accum_steps",
            "epochs",
            "eval_batch_size",
            "log_every_steps",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, f"must be a positive integer, got {getattr(self, key)!r}")
        for key in ("max_steps", "train_limit", "dev_limit", "num_threads"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(key, f"must be a positive integer or null, got {v!r}")
        if not 0 < self.lr < 1:
            bad("lr", f"must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.checkpoint_every_steps < 0:
            bad("checkpoint_every_steps", "must be >= 0")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            bad("mixed_precision", "must be one of auto, no, bf16, fp16")
        if self.checkpoint_s3_uri is not None and not self.checkpoint_s3_uri.startswith("s3://"):
            bad("checkpoint_s3_uri", f"must be an s3:// URI, got {self.checkpoint_s3_uri!r}")
        if not self.train:
            bad("train", "is required")
        if not self.output_dir:
            bad("output_dir", "is required")

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint_dir or f"{self.output_dir.rstrip('/')}/checkpoints"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field (``--max-seq-len``); booleans as ``--no-resume`` style pairs."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            required = f.default is dataclasses.MISSING
            if f.type in ("bool",):
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
                continue
            conv = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, dest=f.name, type=conv, required=required, default=None)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in vars(ns).items() if k in names and v is not None})
