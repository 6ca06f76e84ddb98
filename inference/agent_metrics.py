"""From the inference server's Prometheus ``/metrics`` to the per-minute datapoints the autoscaler
reads (``chalicelib.fleet`` documents the CloudWatch side). Pure: text in, numbers out.

Example::

    >>> text = '''nlpfleet_requests_total{code="200"} 10.0
    ... nlpfleet_requests_total{code="429"} 2.0
    ... nlpfleet_inflight_requests 3.0
    ... nlpfleet_queue_depth 1.0
    ... nlpfleet_request_latency_seconds_bucket{le="0.1"} 9.0
    ... nlpfleet_request_latency_seconds_bucket{le="0.5"} 10.0
    ... nlpfleet_request_latency_seconds_bucket{le="+Inf"} 10.0
    ... nlpfleet_request_latency_seconds_sum 1.5
    ... '''
    >>> s = parse_scrape(text)
    >>> (s.answered, s.throttled, s.inflight, s.queue_depth, s.latency_sum_s)
    (10.0, 2.0, 3.0, 1.0, 1.5)
    >>> p99_from_buckets(s.latency_buckets, {})
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    answered: float = 0.0  # requests answered with any status but 429 (cumulative)
    throttled: float = 0.0  # 429s (cumulative)
    inflight: float = 0.0
    queue_depth: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    latency_sum_s: float | None = None  # seconds requests spent admitted, summed (cumulative)


def parse_scrape(text: str) -> Scrape:
    answered = throttled = inflight = queue = 0.0
    latency_sum = None
    buckets: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "nlpfleet_requests_total":
                if s.labels.get("code") == "429":
                    throttled += s.value
                else:
                    answered += s.value
            elif s.name == "nlpfleet_inflight_requests":
                inflight = s.value
            elif s.name == "nlpfleet_queue_depth":
                queue = s.value
            elif s.name == "nlpfleet_request_latency_seconds_bucket":
                buckets[float(s.labels["le"])] = s.value
            elif s.name == "nlpfleet_request_latency_seconds_sum":
                latency_sum = s.value
    return Scrape(answered, throttled, inflight, queue, buckets, latency_sum)


def p99_from_buckets(now: dict[float, float], before: dict[float, float]) -> float | None:
    """p99 of the requests observed between two scrapes: the upper bound of the first bucket
    holding 99 % of them (None when none was observed; the largest finite bound for +Inf)."""
    delta = {le: now[le] - before.get(le, 0.0) for le in now}
    total = delta.get(math.inf, max(delta.values(), default=0.0))
    if total <= 0:
        return None
    finite = [le for le in sorted(delta) if le != math.inf]
    for le in finite:
        if delta[le] >= 0.99 * total:
            return le
    return finite[-1] if finite else None


def minute_datapoints(
    before: Scrape, now: Scrape, gauges: list[tuple[float, float]], elapsed_s: float | None = None
) -> dict[str, float]:
    """CloudWatch values for one period: counter deltas, mean in-flight, queue mean, latency p99.

    ``gauges`` are the (inflight, queue_depth) samples taken during the period, ``elapsed_s`` its
    length in seconds. The mean number of requests in flight is, by Little's law, the time the
    period's requests spent admitted divided by its length (the latency histogram's sum: the
    server times each request from admission to answer); samples of the in-flight gauge only
    estimate it (a few samples of a mostly-0-or-1 gauge are noise at low load), and stand in
    when the sum or the length is missing.

    >>> a, b = Scrape(answered=5, latency_sum_s=1.0), Scrape(answered=65, throttled=3, latency_sum_s=7.0)
    >>> minute_datapoints(a, b, [(2.0, 0.0), (4.0, 1.0)])["InflightRequests"]
    3.0
    >>> minute_datapoints(a, b, [(2.0, 0.0), (4.0, 1.0)], elapsed_s=60.0)["InflightRequests"]
    0.1
    """
    gauge_mean = sum(g[0] for g in gauges) / len(gauges) if gauges else now.inflight
    inflight = gauge_mean
    if elapsed_s and now.latency_sum_s is not None and before.latency_sum_s is not None:
        inflight = max(0.0, now.latency_sum_s - before.latency_sum_s) / elapsed_s
    out = {
        "RequestCount": max(0.0, now.answered - before.answered),
        "ThrottledCount": max(0.0, now.throttled - before.throttled),
        "InflightRequests": inflight,
        "QueueDepth": sum(g[1] for g in gauges) / len(gauges) if gauges else now.queue_depth,
    }
    p99 = p99_from_buckets(now.latency_buckets, before.latency_buckets)
    if p99 is not None:
        out["LatencyP99"] = p99
    return out
