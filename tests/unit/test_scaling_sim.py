"""The trace simulator (``bench/autoscale_sim.py``): the oracle is the exact cheapest schedule,
and any per-minute CSV with ``unix_time`` and ``requests`` replays end to end."""

from __future__ import annotations

import csv
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import autoscale_sim as sim  # noqa: E402


def brute_force_cost(need: list[int], boot: int) -> float:
    """Cheapest on/off schedule per capacity level by enumeration (levels are independent). As in
    the simulator, the levels needed at minute 0 start warm; any other start is a launch."""
    total = 0.0
    for k in range(1, max(need) + 1):
        on_needed = [n >= k for n in need]
        best = math.inf
        for bits in itertools.product([0, 1], repeat=len(need)):
            if any(req and not b for req, b in zip(on_needed, bits, strict=True)):
                continue
            cost, prev = 0, 0
            for i, b in enumerate(bits):
                if b:
                    cost += 1
                    if not prev and not (i == 0 and on_needed[0]):
                        cost += boot  # a launch is billed for its boot before it serves
                prev = b
            best = min(best, cost)
        total += best
    return total


@pytest.mark.parametrize("boot", [1, 2, 4])
def test_oracle_is_the_exact_cheapest_schedule(boot):
    rng = np.random.default_rng(boot)
    for _ in range(20):
        need = rng.integers(0, 4, size=10)
        ready, cost = sim.oracle(need, boot)
        assert cost == brute_force_cost(list(need), boot)
        assert (ready >= need).all()


def test_oracle_keeps_an_instance_through_a_gap_shorter_than_a_boot():
    ready, cost = sim.oracle(np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 1]), boot_min=4)
    assert list(ready[:4]) == [1, 1, 1, 1] and ready[5] == 0
    assert cost == 4 + 4 + 1  # 4 minutes kept warm, one relaunch (4), one serving minute


def test_replays_any_per_minute_csv(tmp_path):
    """Two synthetic days with a business-hours ramp: every policy runs, the table and the PNGs
    are written, the oracle is cheapest and the project's policy beats static provisioning."""
    trace = tmp_path / "trace.csv"
    rng = np.random.default_rng(7)
    with open(trace, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["unix_time", "requests"])
        for i in range(2 * 1440):
            hour = (i // 60) % 24
            base = 80 if 9 <= hour < 18 else 20
            w.writerow([1_800_000_000 + 60 * i, int(rng.poisson(base))])
    out = tmp_path / "out.png"
    assert sim.main(["--trace", str(trace), "--out", str(out), "--zoom-days", "0.3,0.5"]) == 0
    table = json.loads(out.with_suffix(".json").read_text())["table"]
    assert out.exists() and (tmp_path / "out_zoom.png").exists()
    assert table["oracle"]["vs_oracle"] == 1.0
    assert all(row["vs_oracle"] >= 1.0 or name.startswith("target_tracking") or name == "step"
               for name, row in table.items())  # fmt: skip
    assert table["predictive"]["instance_hours"] < table["static"]["instance_hours"]
    assert table["predictive"]["under_provisioned_pct"] < 2.0


def test_split_reports_both_parts_of_one_replay(tmp_path):
    """``--split``: the two parts' instance-hours add up to the whole run's (same replay, same
    scale factor), each part has its own oracle, and a date outside the trace is refused."""
    trace = tmp_path / "trace.csv"
    rng = np.random.default_rng(3)
    start = 1_800_000_000 - 1_800_000_000 % 86400  # midnight UTC
    with open(trace, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["unix_time", "requests"])
        for i in range(2 * 1440):
            w.writerow([start + 60 * i, int(rng.poisson(60 if 600 <= i % 1440 < 1200 else 15))])
    out = tmp_path / "out.png"
    assert (
        sim.main(["--trace", str(trace), "--out", str(out), "--zoom-days", "", "--split", "2027-01-16"]) == 0
    )
    doc = json.loads(out.with_suffix(".json").read_text())
    parts = list(doc["segments"].values())
    assert list(doc["segments"]) == ["2027-01-15..2027-01-15", "2027-01-16..2027-01-16"]
    for name in ("predictive", "static", "step"):
        total = sum(p[name]["instance_hours"] for p in parts)
        assert abs(total - doc["table"][name]["instance_hours"]) <= 0.2
    assert all(p["oracle"]["vs_oracle"] == 1.0 for p in parts)
    with pytest.raises(SystemExit):
        sim.main(["--trace", str(trace), "--out", str(out), "--split", "2030-01-01"])


def test_bounds_are_exact_without_noise_and_never_below_the_oracle():
    """``bench/autoscale_bounds.py``: a noiseless trace costs what the oracle costs; a noisy one
    is covered within the miss budget at no less than the oracle's cost."""
    import autoscale_bounds as ab

    flat = np.full(600, 3.0)
    for row in ab.bounds(np.ceil(flat).astype(int), flat, 4, 6, 15, [15], 0.5).values():
        assert row == {"vs_oracle": 1.0, "under_provisioned_pct": 0.0}
    rng = np.random.default_rng(0)
    load = rng.poisson(60, size=3000) / 20.0
    noisy = ab.bounds(np.ceil(load - 1e-9).astype(int), load, 4, 6, 15, [15], 0.5)
    assert all(
        1.0 <= row["vs_oracle"] < 1.2 and row["under_provisioned_pct"] <= 0.5 for row in noisy.values()
    )
    # the policy-signal mapping fitted on one part and scored on the other
    exact = ab.fitted_then_held_out(np.ceil(flat).astype(int), flat, 6, 300, 0.5)
    assert (exact["vs_oracle"], exact["under_provisioned_pct"]) == (1.0, 0.0)
    held = ab.fitted_then_held_out(np.ceil(load - 1e-9).astype(int), load, 6, 1500, 0.5)
    assert 1.0 <= held["vs_oracle"] < 1.3 and held["under_provisioned_pct"] <= 0.5


def test_learned_bound_reads_only_what_a_policy_could_know_when_it_orders():
    """``autoscale_bounds.causal_features``: a minute's features use nothing after its order
    time (``lag`` minutes earlier): changing the load from minute k on leaves the features of
    every minute up to k + lag - 1 as they were, and changes later ones."""
    import autoscale_bounds as ab

    rng = np.random.default_rng(1)
    n, lag, k = 12_000, 6, 11_000
    t = 804_556_800 + 60 * np.arange(n)  # 1995-07-01 UTC, one row a minute
    load = rng.poisson(60, size=n) / 20.0
    changed = load.copy()
    changed[k:] *= 3
    a, b = ab.causal_features(t, load, lag), ab.causal_features(t, changed, lag)
    np.testing.assert_array_equal(a[: k + lag], b[: k + lag])
    assert not np.allclose(a[k + lag :, 0], b[k + lag :, 0])


def test_learned_bound_covers_a_held_out_part_at_no_less_than_the_oracle():
    import autoscale_bounds as ab

    pytest.importorskip("sklearn")
    rng = np.random.default_rng(2)
    n = 4 * 1440
    t = 804_556_800 + 60 * np.arange(n)
    daily = 4 + 3 * np.sin(2 * np.pi * np.arange(n) / 1440)  # a daily cycle, 1-7 instances
    load = rng.poisson(daily * 20) / 20.0
    need = np.ceil(load - 1e-9).astype(int)
    rows = ab.learned_quantile(t, need, load, 6, 3 * 1440, 0.5, quantiles=(0.9,))
    row = rows["q=0.9"]
    assert row["vs_oracle"] >= 1.0 and row["fitted_part_vs_oracle"] >= 1.0
    assert row["fitted_part_under_provisioned_pct"] <= 0.5
    assert row["under_provisioned_pct"] <= 2.0  # held out: calibrated on the fitted part only
