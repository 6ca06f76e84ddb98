"""Replay a compressed slice of a per-minute request trace against an HTTP endpoint.

The trace (``requests_per_minute.csv``: ``minute_start``, ``unix_time``, ``requests``) is cut
to ``minutes`` starting at ``start`` and compressed: one trace minute lasts
``1 / trace_minutes_per_s`` real seconds and carries ``requests × rate_mult`` requests, sent at
seeded-random instants within it (open loop: a slow server does not slow the sender down, as
real users do not wait for each other). Each request classifies one text (Banking77 texts as
request bodies).

Every request ends in exactly one outcome:

- ``ok``: 200;
- ``refused``: the system said no before doing the work: 429 (the server's admission limit),
  503 (no healthy target at the load balancer, or a draining server);
- ``failed``: anything else: a 5xx other than 503, a 4xx other than 429, a timeout, a broken
  connection. These are the *failed admitted requests*.

Example::

    >>> plan = send_plan([60, 120], trace_minutes_per_s=2.0, rate_mult=0.1, seed=1)
    >>> len(plan), plan[0][1], max(t for t, _ in plan) < 1.0
    (18, 0, True)
"""

from __future__ import annotations

import asyncio
import csv
import random
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import httpx


def load_trace(path: str | Path, start: str, minutes: int) -> list[tuple[int, int]]:
    """``minutes`` rows of ``(unix_time, requests)`` from ``start`` (ISO 8601, as in the file's
    ``minute_start`` column, e.g. ``1995-07-13T06:00:00-04:00``)."""
    t0 = int(datetime.fromisoformat(start).timestamp())
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = int(row["unix_time"])
            if t < t0:
                continue
            out.append((t, int(row["requests"])))
            if len(out) == minutes:
                break
    if len(out) < minutes:
        raise ValueError(f"trace {path} has only {len(out)} minutes from {start}")
    return out


def load_texts(path: str | Path, column: str = "text", limit: int | None = None) -> list[str]:
    with open(path, newline="") as f:
        texts = [row[column] for row in csv.DictReader(f) if row.get(column)]
    return texts[:limit] if limit else texts


def send_plan(
    counts: list[int], *, trace_minutes_per_s: float, rate_mult: float, seed: int = 0
) -> list[tuple[float, int]]:
    """(offset in real seconds, trace minute index) for every request, sorted by offset."""
    rng = random.Random(seed)
    minute_s = 1.0 / trace_minutes_per_s
    plan = []
    carry = 0.0
    for i, c in enumerate(counts):
        expected = c * rate_mult + carry
        n = int(expected)
        carry = expected - n  # keep fractions, so low-rate slices are not rounded away
        plan.extend((i * minute_s + rng.random() * minute_s, i) for _ in range(n))
    plan.sort()
    return plan


@dataclass
class Result:
    sent_at: float  # seconds since the replay started
    minute: int  # trace minute index
    latency_s: float
    status: int  # 0: no HTTP response
    outcome: str  # ok | refused | failed
    target: str | None = None
    error: str | None = None
    model: str | None = None  # "name/version" that answered


def classify_outcome(status: int) -> str:
    if status == 200:
        return "ok"
    if status in (429, 503):
        return "refused"
    return "failed"


async def _one(client, url, text, sent_at, minute, t0, results, sem):
    async with sem:
        start = time.monotonic()
        try:
            r = await client.post(url, json={"inputs": [text]})
            status, target, error, model = r.status_code, r.headers.get("x-nlpfleet-target"), None, None
            if status != 200:
                error = r.text[:200]
            else:
                m = r.json().get("model") or {}
                model = f"{m.get('name')}/{m.get('version')}"
        except (httpx.HTTPError, ValueError) as exc:
            status, target, error, model = 0, None, f"{type(exc).__name__}: {exc}"[:200], None
        results.append(
            Result(
                sent_at,
                minute,
                time.monotonic() - start,
                status,
                classify_outcome(status),
                target,
                error,
                model,
            )
        )


async def replay(
    url: str,
    plan: list[tuple[float, int]],
    texts: list[str],
    *,
    timeout_s: float = 30.0,
    max_outstanding: int = 256,
    on_tick=None,
) -> list[Result]:
    """Send every planned request to ``url`` (POST ``{"inputs": [text]}``) at its offset.

    ``on_tick(seconds_since_start, trace_minute)`` is called about every second; when it returns
    True the replay sends nothing more (requests already sent still get their outcome)."""
    results: list[Result] = []
    sem = asyncio.Semaphore(max_outstanding)
    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        next_tick = 0.0
        for i, (offset, minute) in enumerate(plan):
            delay = offset - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic() - t0
            if on_tick and now >= next_tick:
                if on_tick(now, minute) is True:
                    break
                next_tick = now + 1.0
            text = texts[i % len(texts)]
            tasks.append(asyncio.create_task(_one(client, url, text, offset, minute, t0, results, sem)))
        if tasks:
            await asyncio.gather(*tasks)
    results.sort(key=lambda r: r.sent_at)
    return results


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(q / 100.0 * (len(v) - 1)))))
    return v[k]


def summarize(results: list[Result]) -> dict:
    ok = [r.latency_s for r in results if r.outcome == "ok"]
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    return {
        "requests": len(results),
        "served": len(ok),
        "refused": sum(r.outcome == "refused" for r in results),
        "failed": sum(r.outcome == "failed" for r in results),
        "p50_s": percentile(ok, 50),
        "p99_s": percentile(ok, 99),
        "by_status": by_status,
        "by_target": _count(r.target for r in results if r.target),
        "failures": [asdict(r) for r in results if r.outcome == "failed"][:20],
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def windows(results: list[Result], width_s: float = 2.0) -> list[dict]:
    """Per-window request rate, refusals, failures and p99 latency (for the timeline)."""
    if not results:
        return []
    end = max(r.sent_at for r in results)
    out = []
    t = 0.0
    while t <= end:
        rs = [r for r in results if t <= r.sent_at < t + width_s]
        ok = [r.latency_s for r in rs if r.outcome == "ok"]
        out.append(
            {
                "t": t,
                "rps": len(rs) / width_s,
                "refused": sum(r.outcome == "refused" for r in rs),
                "failed": sum(r.outcome == "failed" for r in rs),
                "p99_s": percentile(ok, 99),
            }
        )
        t += width_s
    return out
