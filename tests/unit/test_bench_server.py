"""``bench/bench_server.py``'s bookkeeping: the request bodies wrk replays and the CPU split
the benchmark reports (the arithmetic a reader takes the ceiling from)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import bench_server as bs  # noqa: E402


def test_wrk_bodies_hold_the_texts_per_request_asked_for(tmp_path):
    texts = [f"question number {i}" for i in range(19)]
    one = bs.wrk_script(texts, tmp_path / "one.lua").read_text()
    eight = bs.wrk_script(texts, tmp_path / "eight.lua", per_request=8).read_text()
    bodies = [json.loads(b) for b in re.findall(r"\[==\[(.*?)\]==\]", one)]
    assert [b["inputs"] for b in bodies] == [[t] for t in texts]
    groups = [json.loads(b)["inputs"] for b in re.findall(r"\[==\[(.*?)\]==\]", eight)]
    # Whole groups only: every request carries exactly eight texts (the last three are left out).
    assert groups == [texts[0:8], texts[8:16]]


def test_cpu_split_gives_the_ceiling_that_the_serving_cost_leaves():
    med = {
        "raw_sorted_cpu_ms": 1.0,
        "server_cpu_ms": 1.5,  # the whole server process per request
        "server_model_cpu_ms": 1.2,  # of which model runs
        "server_wrk_cpu_ms": 0.05,
    }
    split = bs._cpu_split(med)["cpu_split"]
    assert set(split) == {"server"}  # concurrencies not measured are left out
    s = split["server"]
    assert s["serving_cpu_ms_per_request"] == pytest.approx(0.3)
    assert s["model_runs_vs_raw_cpu_per_text"] == pytest.approx(1.2)
    # With model runs as cheap as the raw session's: 1.0 / (1.0 + 0.3 + 0.05)
    assert s["ceiling_vs_raw_sorted"] == pytest.approx(1.0 / 1.35)
