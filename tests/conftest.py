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
