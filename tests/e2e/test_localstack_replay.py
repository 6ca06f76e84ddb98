"""The trace replay: the plan follows the trace's shape, every request gets exactly one outcome."""

from localstack.replay import Result, classify_outcome, load_trace, send_plan, summarize, windows


def test_plan_follows_the_trace_and_keeps_fractions(data_dir):
    trace = load_trace(
        data_dir / "nasa_http_jul95" / "requests_per_minute.csv", "1995-07-12T03:00:00-04:00", 120
    )
    counts = [c for _, c in trace]
    plan = send_plan(counts, trace_minutes_per_s=6.0, rate_mult=0.05, seed=1)
    assert abs(len(plan) - sum(counts) * 0.05) < 1  # fractions carried, not rounded away
    assert all(0 <= t < 120 / 6.0 for t, _ in plan) and plan == sorted(plan)
    per_minute = [sum(1 for _, m in plan if m == i) for i in range(120)]
    busiest = max(range(120), key=counts.__getitem__)
    assert per_minute[busiest] >= max(per_minute) - 1


def test_outcomes_separate_refusals_from_failures():
    assert [classify_outcome(c) for c in (200, 429, 503, 500, 502, 504, 422, 0)] == [
        "ok",
        "refused",
        "refused",
        "failed",
        "failed",
        "failed",
        "failed",
        "failed",
    ]
    rs = [
        Result(0.1, 0, 0.02, 200, "ok", "i-a"),
        Result(0.5, 0, 0.04, 200, "ok", "i-b"),
        Result(1.2, 0, 0.01, 429, "refused"),
        Result(2.5, 1, 1.0, 0, "failed", error="ReadError"),
    ]
    s = summarize(rs)
    assert (s["requests"], s["served"], s["refused"], s["failed"]) == (4, 2, 1, 1)
    assert s["by_target"] == {"i-a": 1, "i-b": 1} and s["p50_s"] in (0.02, 0.04)
    w = windows(rs, width_s=2.0)
    assert [x["failed"] for x in w] == [0, 1] and w[0]["rps"] == 1.5
