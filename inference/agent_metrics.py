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
    ... '''
    >>> s = parse_scrape(text)
    >>> (s.answered, s.throttled, s.inflight, s.queue_depth)
    (10.0, 2.0, 3.0, 1.0)
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


def parse_scrape(text: str) -> Scrape:
    answered = throttled = inflight = queue = 0.0
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
    return Scrape(answered, throttled, inflight, queue, buckets)


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


def minute_datapoints(before: Scrape, now: Scrape, gauges: list[tuple[float, float]]) -> dict[str, float]:
    """CloudWatch values for one period: counter deltas, gauge means, latency p99.

    ``gauges`` are the (inflight, queue_depth) samples taken during the period.

    >>> a, b = Scrape(answered=5), Scrape(answered=65, throttled=3)
    >>> minute_datapoints(a, b, [(2.0, 0.0), (4.0, 1.0)])["InflightRequests"]
    3.0
    """
    out = {
        "RequestCount": max(0.0, now.answered - before.answered),
        "ThrottledCount": max(0.0, now.throttled - before.throttled),
        "InflightRequests": sum(g[0] for g in gauges) / len(gauges) if gauges else now.inflight,
        "QueueDepth": sum(g[1] for g in gauges) / len(gauges) if gauges else now.queue_depth,
    }
    p99 = p99_from_buckets(now.latency_buckets, before.latency_buckets)
    if p99 is not None:
        out["LatencyP99"] = p99
    return out
