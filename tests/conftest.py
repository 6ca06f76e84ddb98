"""Fixtures every test area shares: offline model loading and the shared data folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (CI lays it there too); NLPFLEET_SHARED overrides."""
    root = Path(os.environ.get("NLPFLEET_SHARED", REPO.parent / "shared"))
    return root / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "banking77" / "train.csv").exists():
        pytest.fail(f"shared data not found at {d}: set NLPFLEET_SHARED to the shared/ folder")
    return d


# ---------------------------------------------------------------- model fixtures (issue 2)
#
# ``trained_artifact``: a real, small fine-tune of the packaged MiniLM on a banking77 slice (all 77
# labels), exported by the real pipeline (fp32/int8/fp16 + parity gate + manifest). Built once per
# source version and cached under .cache/test-artifacts/<sha of the code that makes it>, so local
# reruns are instant while a fresh CI clone builds it once (about a minute on 2 CPU cores).

FIXTURE_SOURCES = ("training", "inference/export.py", "inference/parity.py", "chalicelib/manifest.py")
FIXTURE_RECIPE = {
    "per_label_train": 6,
    "per_label_dev": 2,
    "max_seq_len": 32,
    "batch_size": 16,
    "epochs": 2,
    "lr": 3e-4,
    "warmup_ratio": 0.1,
    "seed": 13,
}


def banking77_slice(data_dir: Path, split: str, per_label: int, dest: Path) -> Path:
    """The first ``per_label`` rows of each of the 77 intents of banking77 ``split``, as a CSV."""
    import csv

    rows, seen = [], {}
    with open(data_dir / "banking77" / f"{split}.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if seen.get(row["category"], 0) < per_label:
                seen[row["category"]] = seen.get(row["category"], 0) + 1
                rows.append(row)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return dest


def _fixture_key() -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(FIXTURE_RECIPE, sort_keys=True).encode())
    for src in FIXTURE_SOURCES:
        p = REPO / src
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_trained_artifact(data_dir: Path, dest: Path) -> Path:
    """Train + export into ``dest`` (an artifact directory); returns it."""
    import json
    import shutil
    import tempfile

    from inference.export import export_model
    from training.config import TrainConfig
    from training.worker import train

    r = FIXTURE_RECIPE
    with tempfile.TemporaryDirectory(prefix="trained-artifact-") as tmp:
        tmp = Path(tmp)
        config = TrainConfig(
            train=str(banking77_slice(data_dir, "train", r["per_label_train"], tmp / "train.csv")),
            dev=str(banking77_slice(data_dir, "dev", r["per_label_dev"], tmp / "dev.csv")),
            label_column="category",
            output_dir=str(tmp / "run"),
            max_seq_len=r["max_seq_len"],
            batch_size=r["batch_size"],
            epochs=r["epochs"],
            lr=r["lr"],
            warmup_ratio=r["warmup_ratio"],
            seed=r["seed"],
            num_threads=1,  # 2 shared cores: one thread per process beats OpenMP spinning
            freeze_embeddings=True,
            progress_bar=False,
            resume=False,
        )
        result = train(config)
        staging = dest.parent / (".tmp-" + dest.name)
        shutil.rmtree(staging, ignore_errors=True)
        export_model(
            result.model_dir,
            staging,
            name="banking77",
            version="test-" + dest.parent.name,
            labels=result.labels,
            heldout_texts=result.heldout_texts,
            heldout_labels=result.heldout_labels,
            dataset_sha256=result.dataset_sha256,
            metrics=result.metrics,
            max_seq_len=r["max_seq_len"],
            base_model=result.base_model,
            num_threads=1,
        )
        (dest.parent / "train_result.json").write_text(json.dumps(result.to_dict(), indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest


def _prune_stale(cache: Path, keep: Path, max_age_s: float = 3600) -> None:
    """Drop artifacts built from older sources (about 200 MB each) once nobody used them for an hour."""
    import shutil
    import time

    for d in cache.iterdir():
        if d != keep and d.is_dir() and time.time() - d.stat().st_mtime > max_age_s:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_artifact(data_dir) -> Path:
    """A verified artifact directory (``manifest.json``, ``model.onnx``, ``model.int8.onnx``,
    ``model.fp16.onnx``, tokenizer, ``labels.json``) of a small real banking77 fine-tune:
    77 labels, max_seq_len 32, dev accuracy well above chance (1/77) but far below a full run.
    Treat it as read-only (copy it to modify it): it is shared by every test and every run."""
    import fcntl

    from inference.artifact import ArtifactError, verify_artifact

    cache = Path(os.environ.get("NLPFLEET_TEST_CACHE", REPO / ".cache" / "test-artifacts"))
    root = cache / _fixture_key()
    root.mkdir(parents=True, exist_ok=True)
    _prune_stale(cache, keep=root)
    dest = root / "artifact"
    # Other test processes (other engineers, xdist workers) may be building the same key.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            verify_artifact(dest)
            os.utime(root)  # in use: keep it from being pruned
        except ArtifactError:
            build_trained_artifact(data_dir, dest)
            verify_artifact(dest)
    return dest


@pytest.fixture(scope="session")
def minilm_2layer() -> Path:
    """A real pretrained checkpoint, made small: the packaged MiniLM cut to its first 2 of 6
    layers (same tokenizer, same pretrained weights for what remains). For tests of training
    mechanics (resume, DDP) that need a real BERT-family model, not a good one; it also
    exercises the worker's ``model_dir`` option (any local checkpoint directory). Cached
    under .cache/test-models (it depends only on the installed package)."""
    import fcntl
    import shutil

    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from training.worker import default_model_dir

    cache = (
        Path(os.environ.get("NLPFLEET_TEST_CACHE", REPO / ".cache" / "test-artifacts")).parent / "test-models"
    )
    dest = cache / "minilm-l2"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").is_file():
            base = default_model_dir()
            tmp = cache / ".tmp-minilm-l2"
            shutil.rmtree(tmp, ignore_errors=True)
            config = AutoConfig.from_pretrained(base, num_hidden_layers=2)
            AutoModel.from_pretrained(base, config=config).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
            tmp.rename(dest)
    return dest
