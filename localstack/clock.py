"""A local clock for EventBridge schedules, able to run faster than real time.

moto stores rules with a ``ScheduleExpression`` but never fires them. ``Scheduler`` reads the
scheduled rules from the stand-in's EventBridge, and when a rule is due on the ``Clock`` it
delivers what EventBridge delivers to the rule's SQS targets: the "Scheduled Event" envelope
(or the target's constant ``Input``). The dispatcher then hands it to the handler, exactly
like any other event.

Semantics follow the EventBridge documentation: ``rate(N minute|minutes|hour|hours|day|days)``
fires every N units starting one period after the rule is first seen; ``cron(min hour dom month
dow year)`` is evaluated in UTC, with ``?`` in one of the two day fields, ``1-7`` or
``SUN-SAT`` for day-of-week (1 = Sunday), ranges, lists and ``/`` steps (``L``, ``W`` and ``#``
are refused). Ticks missed while the process was busy are coalesced into one delivery, as
EventBridge never back-fills a schedule.

Example::

    >>> from datetime import datetime, UTC
    >>> next_fire("cron(0 8 ? * MON-FRI *)", datetime(2026, 11, 27, 9, 0, tzinfo=UTC))
    datetime.datetime(2026, 11, 30, 8, 0, tzinfo=datetime.timezone.utc)
    >>> next_fire("rate(5 minutes)", datetime(2026, 11, 27, 9, 0, 30, tzinfo=UTC))
    datetime.datetime(2026, 11, 27, 9, 5, 30, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

_RATE_RE = re.compile(r"^rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)$")
_UNITS = {"minute": 60, "hour": 3600, "day": 86400}
_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {d: i + 1 for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}


class Clock:
    """Virtual time: ``start`` (epoch seconds, default now) plus real elapsed time × ``speed``."""

    def __init__(self, speed: float = 1.0, start: float | None = None, *, monotonic=time.monotonic):
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._mono = monotonic
        self._real0 = monotonic()
        self._wall0 = time.time()
        self._virt0 = self._wall0 if start is None else start

    def now(self) -> float:
        return self._virt0 + (self._mono() - self._real0) * self.speed

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    def env_value(self) -> str:
        """This clock for another process on this machine: ``"<wall epoch> <virtual epoch> <speed>"``
        (``NLPFLEET_LOCAL_CLOCK``, read by the instance agent to stamp its datapoints)."""
        return f"{self._wall0:.6f} {self._virt0:.6f} {self.speed:g}"

    def real_seconds(self, virtual_s: float) -> float:
        return virtual_s / self.speed

    def sleep(self, virtual_s: float) -> None:
        time.sleep(max(0.0, virtual_s / self.speed))


def rate_period_s(expr: str) -> int | None:
    m = _RATE_RE.match(expr.strip())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).rstrip("s")
    if n <= 0 or (n == 1) != (m.group(2) == unit):
        raise ValueError(f"{expr}: use the singular unit for 1 and the plural otherwise")
    return n * _UNITS[unit]


def _field(text: str, lo: int, hi: int, names: dict[str, int] | None = None) -> set[int] | None:
    """Values a cron field allows, or None for '?' / '*' (any)."""
    if text in ("*", "?"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        if any(c in part for c in "LW#"):
            raise ValueError(f"cron field {text!r}: L, W and # are not supported locally")
        step = 1
        if "/" in part:
            part, step_s = part.split("/")
            step = int(step_s)
        if part in ("*", ""):
            a, b = lo, hi
        elif "-" in part:
            a_s, b_s = part.split("-")
            a, b = _num(a_s, names), _num(b_s, names)
        else:
            a = _num(part, names)
            b = hi if step > 1 else a
        if not (lo <= a <= hi and lo <= b <= hi):
            raise ValueError(f"cron field {text!r} out of range {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return out


def _num(s: str, names: dict[str, int] | None) -> int:
    s = s.strip().upper()
    if names and s in names:
        return names[s]
    return int(s)


def parse_cron(expr: str):
    m = re.match(r"^cron\((.*)\)$", expr.strip())
    if not m:
        return None
    parts = m.group(1).split()
    if len(parts) != 6:
        raise ValueError(f"{expr}: EventBridge cron takes 6 fields (min hour dom month dow year)")
    mi, hr, dom, mon, dow, yr = parts
    if (dom == "?") == (dow == "?"):
        raise ValueError(f"{expr}: exactly one of day-of-month and day-of-week must be '?'")
    return (
        _field(mi, 0, 59),
        _field(hr, 0, 23),
        _field(dom, 1, 31),
        _field(mon, 1, 12, _MONTHS),
        _field(dow, 1, 7, _DAYS),
        _field(yr, 1970, 2199),
    )


def next_fire(expr: str, after: datetime, first_seen: datetime | None = None) -> datetime:
    """The first firing time strictly after ``after``. For ``rate()`` the schedule is anchored
    at ``first_seen`` (default: ``after``)."""
    period = rate_period_s(expr)
    if period is not None:
        anchor = first_seen or after
        n = int((after - anchor).total_seconds() // period) + 1
        return anchor + timedelta(seconds=n * period)
    fields = parse_cron(expr)
    if fields is None:
        raise ValueError(f"unsupported schedule expression {expr!r}")
    mi, hr, dom, mon, dow, yr = fields
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    limit = t + timedelta(days=366 * 5)
    while t < limit:
        if (yr is not None and t.year not in yr) or (mon is not None and t.month not in mon):
            t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            continue
        day_ok = (dom is None or t.day in dom) and (dow is None or (t.isoweekday() % 7) + 1 in dow)
        if not day_ok:
            t = t.replace(hour=0, minute=0) + timedelta(days=1)
            continue
        if hr is not None and t.hour not in hr:
            t = t.replace(minute=0) + timedelta(hours=1)
            continue
        if mi is not None and t.minute not in mi:
            t += timedelta(minutes=1)
            continue
        return t
    raise ValueError(f"{expr}: never fires")


def scheduled_event(rule_arn: str, when: datetime, account: str, region: str) -> dict:
    """The envelope EventBridge delivers for a scheduled rule (AWS docs, "Scheduled Event")."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": account,
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [rule_arn],
        "detail": {},
    }


class Scheduler:
    """Fires the stand-in's scheduled EventBridge rules on a ``Clock``.

    ``make_client(service)`` returns a boto3 client for the stand-in. Rules are re-read every
    ``refresh_s`` real seconds, so rules created or disabled later are honoured.
    """

    def __init__(
        self,
        clock: Clock,
        make_client: Callable[[str], object],
        *,
        refresh_s: float = 10.0,
        tick_s: float = 0.05,
        on_fire: Callable[[str, datetime], None] | None = None,
    ):
        self.clock = clock
        self._make_client = make_client
        self._refresh_s = refresh_s
        self._tick_s = tick_s
        self._on_fire = on_fire
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rules: dict[str, dict] = {}  # arn -> {expr, targets, first_seen, next}
        self._last_refresh = -1e9
        self.fired: list[tuple[str, str]] = []  # (rule name, virtual time) for status/tests
        self.coalesced = 0

    def refresh(self) -> None:
        events = self._make_client("events")
        seen = set()
        for page in events.get_paginator("list_rules").paginate():
            for rule in page["Rules"]:
                expr = rule.get("ScheduleExpression")
                if not expr or rule.get("State") != "ENABLED":
                    continue
                arn = rule["Arn"]
                seen.add(arn)
                targets = events.list_targets_by_rule(Rule=rule["Name"])["Targets"]
                now = self.clock.datetime()
                entry = self._rules.get(arn)
                if entry is None or entry["expr"] != expr:
                    entry = {"expr": expr, "first_seen": now, "name": rule["Name"]}
                    entry["next"] = next_fire(expr, now, now)
                    self._rules[arn] = entry
                entry["targets"] = targets
        for arn in set(self._rules) - seen:
            del self._rules[arn]
        self._last_refresh = time.monotonic()

    def due(self) -> int:
        """Deliver every rule that is due now; returns the number delivered."""
        if time.monotonic() - self._last_refresh >= self._refresh_s:
            self.refresh()
        now = self.clock.datetime()
        count = 0
        for arn, entry in self._rules.items():
            if entry["next"] > now:
                continue
            when = entry["next"]
            nxt = next_fire(entry["expr"], when, entry["first_seen"])
            while nxt <= now:  # missed ticks collapse into one delivery
                self.coalesced += 1
                when, nxt = nxt, next_fire(entry["expr"], nxt, entry["first_seen"])
            entry["next"] = nxt
            self._deliver(arn, entry, when)
            count += 1
        return count

    def _deliver(self, arn: str, entry: dict, when: datetime) -> None:
        parts = arn.split(":")
        region, account = parts[3], parts[4]
        sqs = self._make_client("sqs")
        for target in entry["targets"]:
            if ":sqs:" not in target["Arn"]:
                log.warning(
                    "rule %s: target %s is not an SQS queue; not delivered", entry["name"], target["Arn"]
                )
                continue
            body = target.get("Input") or json.dumps(scheduled_event(arn, when, account, region))
            url = sqs.get_queue_url(QueueName=target["Arn"].split(":")[-1])["QueueUrl"]
            sqs.send_message(QueueUrl=url, MessageBody=body)
        self.fired.append((entry["name"], when.isoformat()))
        if self._on_fire:
            self._on_fire(entry["name"], when)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.due()
            except Exception:  # the stand-in may be shutting down; keep the clock alive
                log.exception("scheduler tick failed")
            self._stop.wait(self._tick_s)

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
