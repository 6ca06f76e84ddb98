"""Scaling policies for the inference Auto Scaling Group: pure functions, state in and out.

The per-minute Lambda (``autoscaling_bp.scale``) and the trace simulator (``bench/autoscale_sim.py``)
call the same ``decide(policy, inputs, state, settings, now)``. Nothing here does I/O or reads a
clock: ``now`` is an argument and the policy's memory is the ``PolicyState`` it returns.

Three policies, all on the same inputs:

* ``predictive`` (this project's): target tracking on in-flight requests per instance, counting
  capacity that is already pending; a panic mode that scales out at once when load is far above
  ready capacity; slow, stabilized scale-in; a forecast floor from the same time of day on
  previous days so capacity arrives before the daily ramp; the scheduled floor, min and max.
* ``target_tracking``: what an AWS target-tracking policy does (scale out after 3 one-minute
  datapoints above target, scale in after 15 below 90 % of it, ``ceil(in_service * metric /
  target)``).
* ``step``: the seed's rule, +2 instances on high load, -1 on low load after a cooldown.

The chain of steps of ``predictive`` (each a small pure function, tested on its own):
``fold_history`` -> ``reactive_need`` / ``forecast_need`` -> ``combine_needs`` ->
``stabilize`` -> ``apply_bounds``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from chalicelib.scaling_settings import ScalingSettings

DAY_S = 86400


@dataclass(frozen=True)
class MinuteMetrics:
    """One minute of fleet metrics, as the agents publish them (sums over reporting instances).

    ``inflight`` and ``queue_depth`` are per-minute averages summed over instances; ``requests``
    counts answered requests, ``throttled`` the 429s (demand the fleet turned away).
    """

    t: int
    requests: float = 0.0
    throttled: float = 0.0
    inflight: float = 0.0
    queue_depth: float = 0.0
    p99_latency_s: float | None = None
    instances: int = 0


@dataclass(frozen=True)
class FleetCounts:
    """The ASG as the policy sees it. ``desired`` already includes ``pending`` instances."""

    desired: int
    in_service: int
    pending: int = 0
    draining: int = 0
    min_size: int = 1
    max_size: int = 40


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between invocations (stored as JSON by the Lambda)."""

    last_scale_out_t: float | None = None
    last_scale_in_t: float | None = None
    # (t, needed instances) of recent decisions: scale-in stabilization looks back over these
    recent: tuple[tuple[int, int], ...] = ()
    # (slot index, summed load, minutes) per slot for the last few days: the seasonal forecast
    # (the slot's mean load, also what today's level is compared with)
    seasonal: tuple[tuple[int, float, int], ...] = ()
    last_metric_t: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_scale_out_t": self.last_scale_out_t,
            "last_scale_in_t": self.last_scale_in_t,
            "recent": [list(x) for x in self.recent],
            "seasonal": [[k, round(t, 3), n] for k, t, n in self.seasonal],
            "last_metric_t": self.last_metric_t,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> PolicyState:
        if not doc:
            return cls()
        return cls(
            last_scale_out_t=_opt_float(doc.get("last_scale_out_t")),
            last_scale_in_t=_opt_float(doc.get("last_scale_in_t")),
            recent=tuple((int(t), int(n)) for t, n in doc.get("recent", [])),
            # entries stored before 2026-11 also held the slot's peak: [k, peak, sum, n]
            seasonal=tuple((int(e[0]), float(e[-2]), int(e[-1])) for e in doc.get("seasonal", [])),
            last_metric_t=None if doc.get("last_metric_t") is None else int(doc["last_metric_t"]),
        )


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class PolicyInput:
    metrics: tuple[MinuteMetrics, ...]  # oldest first; the newest is what CloudWatch has now
    fleet: FleetCounts
    scheduled_floor: int = 0


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    state: PolicyState
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.fields.get("previous_desired") != self.desired


# ---------------------------------------------------------------------------------------------
# shared steps


def load_units(m: MinuteMetrics, target_inflight: float) -> float:
    """Offered load of one minute in instances at the target in-flight per instance.

    Admitted work is the in-flight count: every admitted request not answered yet, the queued
    ones included (the server's ``nlpfleet_inflight_requests``; the agent reports its period mean
    by Little's law). Queue depth is a subset of it, counted in texts, so it is not added again.
    429s are demand the fleet turned away, scaled in by Little's law (same latency as the
    answered requests).

    >>> load_units(MinuteMetrics(t=0, requests=600, inflight=16.0), 8.0)
    2.0
    >>> load_units(MinuteMetrics(t=0, requests=600, throttled=600, inflight=16.0), 8.0)
    4.0
    >>> load_units(MinuteMetrics(t=0, requests=600, inflight=16.0, queue_depth=6.0), 8.0)
    2.0
    """
    admitted = m.inflight
    if m.throttled > 0:
        if m.requests > 0:
            admitted *= (m.requests + m.throttled) / m.requests
        else:  # everything refused: at least twice what the reporting fleet can hold
            admitted = max(admitted, 2.0 * target_inflight * max(m.instances, 1))
    return admitted / target_inflight


def apply_bounds(desired: int, fleet: FleetCounts, floor: int) -> int:
    """Clamp to ``[max(min_size, floor), max_size]`` (the max wins over a floor above it).

    >>> apply_bounds(50, FleetCounts(desired=3, in_service=3, min_size=1, max_size=20), floor=4)
    20
    >>> apply_bounds(0, FleetCounts(desired=3, in_service=3, min_size=1, max_size=20), floor=4)
    4
    """
    return max(min(desired, fleet.max_size), min(max(fleet.min_size, floor), fleet.max_size))


# ---------------------------------------------------------------------------------------------
# predictive (this project's policy)


def fold_history(state: PolicyState, metrics: Sequence[MinuteMetrics], s: ScalingSettings) -> PolicyState:
    """Fold minutes not seen before into per-slot load (sum, minutes); keep
    ``forecast_days + 1`` days.

    >>> m = [MinuteMetrics(t=60 * i, requests=1, inflight=8.0 * i) for i in range(3)]
    >>> st = fold_history(PolicyState(), m, ScalingSettings(stage="t", asg_name="a"))
    >>> st.seasonal, st.last_metric_t
    (((0, 3.0, 3),), 120)
    """
    new = [m for m in metrics if state.last_metric_t is None or m.t > state.last_metric_t]
    if not new:
        return state
    slots = {k: (t, n) for k, t, n in state.seasonal}
    for m in new:
        slot = m.t // s.forecast_slot_s
        load = load_units(m, s.target_inflight_per_instance)
        t, n = slots.get(slot, (0.0, 0))
        slots[slot] = (t + load, n + 1)
    newest = max(m.t for m in new)
    keep_from = (newest - (s.forecast_days + 1) * DAY_S) // s.forecast_slot_s
    seasonal = tuple(sorted((k, t, n) for k, (t, n) in slots.items() if k >= keep_from))
    return replace(state, seasonal=seasonal, last_metric_t=newest)


def lead_time_s(s: ScalingSettings) -> int:
    """How far ahead capacity must be decided: boot + metric delay + one policy period."""
    return s.boot_delay_s + s.metric_delay_s + s.period_s


def level_and_noise(loads: Sequence[float], s: ScalingSettings) -> tuple[float, float]:
    """(level, noise): the mean load of the last ``level_window_s`` (or of the last
    ``level_short_window_s`` if higher: a ramp), and the standard deviation of one minute's load
    around the level, estimated from minute-to-minute differences over the whole window
    (``sqrt(mean(diff^2) / 2)``: a slow drift of the level barely moves it, per-minute noise does).

    >>> level_and_noise([2.0, 4.0, 2.0, 4.0], ScalingSettings(stage="t", asg_name="a"))
    (3.0, 1.4142135623730951)
    >>> level_and_noise([3.0] * 10, ScalingSettings(stage="t", asg_name="a"))
    (3.0, 0.0)
    """
    if not loads:
        return 0.0, 0.0
    n = max(1, s.level_window_s // 60)
    recent = loads[-n:]
    level = sum(recent) / len(recent)
    if s.level_short_window_s:  # a rise shows in the last minutes long before in the window's mean
        short = recent[-max(1, s.level_short_window_s // 60) :]
        level = max(level, sum(short) / len(short))
    if len(loads) < 2:
        return level, 0.0
    diffs = [(y - x) ** 2 for x, y in zip(loads, loads[1:], strict=False)]
    return level, math.sqrt(sum(diffs) / len(diffs) / 2.0)


def headroom(noise: float, s: ScalingSettings) -> float:
    """Capacity to hold above the expected level: ``headroom_z`` standard deviations of the
    observed per-minute noise plus ``headroom_min_instances``. Derived from the noise, so a smooth
    load gets little and a bursty one more, at any level (a fixed percentage would waste capacity
    on a high, smooth load and starve a low, bursty one).

    >>> headroom(0.8, ScalingSettings(stage="t", asg_name="a", headroom_z=2.5, headroom_min_instances=0.5))
    2.5
    """
    return s.headroom_z * noise + s.headroom_min_instances


def reactive_need(metrics: Sequence[MinuteMetrics], s: ScalingSettings) -> tuple[float, float, float]:
    """(level + headroom, level, noise) of the visible window.

    >>> ms = [MinuteMetrics(t=60 * i, requests=1, inflight=8.0 * (i % 2 + 2)) for i in range(30)]
    >>> [round(v, 2) for v in reactive_need(ms, ScalingSettings(stage="t", asg_name="a"))]
    [4.15, 2.5, 0.71]
    """
    loads = [load_units(m, s.target_inflight_per_instance) for m in metrics]
    level, noise = level_and_noise(loads, s)
    return level + headroom(noise, s), level, noise


def forecast_need(
    state: PolicyState, now: float, s: ScalingSettings, level: float | None = None, room: float = 0.0
) -> float:
    """The load expected when capacity ordered now is ready, from the same time of day on
    previous days, plus ``room`` (the headroom).

    For each of the last ``forecast_days`` days take the mean load of the slot containing
    ``now + lead time`` a whole number of days earlier; with ``level`` (today's mean load over
    the last half hour) scale it by how busy today is compared with that day at the same time
    (clamped to 0.5x-2x); then take the ``forecast_quantile`` across days. This is what brings
    capacity before a daily ramp: the recent level only sees it minutes late.

    >>> s = ScalingSettings(stage="t", asg_name="a", forecast_days=3, boot_delay_s=0, period_s=0, metric_delay_s=0)
    >>> day_slots = DAY_S // s.forecast_slot_s
    >>> st = PolicyState(seasonal=tuple((k * day_slots, 3.0 * k, 3) for k in (1, 2, 3)))
    >>> forecast_need(st, 4 * DAY_S, replace(s, forecast_quantile=0.5), room=0.5)
    2.5
    """
    if not state.seasonal or s.forecast_days <= 0:
        return 0.0
    slots = {k: (t, n) for k, t, n in state.seasonal}
    at = (int(now) + lead_time_s(s)) // s.forecast_slot_s
    before = range(
        int(now) // s.forecast_slot_s - max(1, 1800 // s.forecast_slot_s), int(now) // s.forecast_slot_s
    )
    day_slots = DAY_S // s.forecast_slot_s
    per_day = []
    for d in range(1, s.forecast_days + 1):
        shift = d * day_slots
        total, count = slots.get(at - shift, (0.0, 0))
        if not count:
            continue
        value = total / count
        if level is not None:
            past = [slots[k - shift] for k in before if k - shift in slots]
            past_n = sum(n for _, n in past)
            if past_n:
                past_level = sum(t for t, _ in past) / past_n
                value *= min(2.0, max(0.5, level / past_level)) if past_level > 0 else 1.0
        per_day.append(value)
    if not per_day:
        return 0.0
    per_day.sort()
    idx = min(len(per_day) - 1, max(0, math.ceil(s.forecast_quantile * len(per_day)) - 1))
    return per_day[idx] * s.forecast_weight + room


def combine_needs(reactive: float, forecast: float) -> tuple[int, str]:
    """Whole instances needed and which signal set it.

    >>> combine_needs(3.2, 5.1)
    (6, 'forecast')
    """
    if forecast > reactive:
        return math.ceil(forecast - 1e-9), "forecast"
    return math.ceil(reactive - 1e-9), "level"


def stabilize(
    need: int, fleet: FleetCounts, state: PolicyState, now: float, s: ScalingSettings, panic: bool
) -> tuple[int, str]:
    """Scale out at once; scale in only to the highest need of the stabilization window, and by at
    most ``scale_in_max_step_fraction`` of the fleet per decision.

    >>> s = ScalingSettings(stage="t", asg_name="a")
    >>> fleet = FleetCounts(desired=10, in_service=10)
    >>> stabilize(4, fleet, PolicyState(recent=((0, 9),)), 60, s, panic=False)
    (9, 'scale-in (stabilized)')
    """
    if need > fleet.desired:
        return need, "panic scale-out" if panic else "scale-out"
    window = [n for t, n in state.recent if t > now - s.scale_in_stabilization_s] + [need]
    target = max(window)
    if target >= fleet.desired:
        return fleet.desired, "hold"
    step = max(1, math.ceil(fleet.desired * s.scale_in_max_step_fraction))
    return max(target, fleet.desired - step), "scale-in (stabilized)"


def decide_predictive(inp: PolicyInput, state: PolicyState, s: ScalingSettings, now: float) -> Decision:
    """This project's policy. See the module docstring for the chain of steps.

    >>> s = ScalingSettings(stage="t", asg_name="a")
    >>> m = tuple(MinuteMetrics(t=60 * i, requests=100, inflight=40.0, instances=2) for i in range(5))
    >>> d = decide_predictive(PolicyInput(m, FleetCounts(desired=2, in_service=2)), PolicyState(), s, 300)
    >>> d.desired, d.reason
    (6, 'panic scale-out: level')
    """
    if not inp.metrics and inp.fleet.in_service > 0:
        # serving instances but no datapoints (agents or CloudWatch broken): never scale in blind
        desired = apply_bounds(inp.fleet.desired, inp.fleet, inp.scheduled_floor)
        fields = {"policy": "predictive", "previous_desired": inp.fleet.desired, "need": None}
        return Decision(desired, "hold: no metrics from a serving fleet", state, fields)
    state = fold_history(state, inp.metrics, s)
    reactive, level, noise = reactive_need(inp.metrics, s)
    room = headroom(noise, s)
    day_level = None
    if s.forecast_level_adjust and inp.metrics:
        recent = [load_units(m, s.target_inflight_per_instance) for m in inp.metrics[-30:]]
        day_level = sum(recent) / len(recent)
    forecast = forecast_need(state, now, s, day_level, room)
    need, signal = combine_needs(reactive, forecast)
    latest = load_units(inp.metrics[-1], s.target_inflight_per_instance) if inp.metrics else 0.0
    ready = max(inp.fleet.in_service, 1)
    panic = latest > s.panic_ratio * ready
    if panic and latest + room > need:
        # far above ready capacity: the window's mean lags a jump, so size for the newest minute
        need, signal = math.ceil(latest + room - 1e-9), "latest minute"
    last = inp.metrics[-1] if inp.metrics else None
    if last and last.p99_latency_s and last.p99_latency_s > s.latency_slo_p99_s and need <= inp.fleet.desired:
        # the SLO is missed at the current size whatever the in-flight says: add one instance
        need, signal = inp.fleet.desired + 1, "p99 latency"
    need = apply_bounds(need, inp.fleet, inp.scheduled_floor)
    desired, how = stabilize(need, inp.fleet, state, now, s, panic)
    desired = apply_bounds(desired, inp.fleet, inp.scheduled_floor)
    if desired > inp.fleet.desired:
        state = replace(state, last_scale_out_t=now)
    elif desired < inp.fleet.desired:
        state = replace(state, last_scale_in_t=now)
    keep = now - max(s.scale_in_stabilization_s, 60)
    state = replace(state, recent=tuple((t, n) for t, n in state.recent if t > keep) + ((int(now), need),))
    floor_note = ""
    if desired == max(inp.fleet.min_size, inp.scheduled_floor) and need <= desired:
        floor_note = " (at floor)"
    reason = f"{how}: {signal}{floor_note}" if how != "hold" else f"hold: {signal} needs {need}"
    fields = {
        "policy": "predictive",
        "previous_desired": inp.fleet.desired,
        "load_level": round(level, 2),
        "noise": round(noise, 2),
        "headroom": round(room, 2),
        "forecast": round(forecast, 2),
        "need": need,
        "panic": panic,
        "scheduled_floor": inp.scheduled_floor,
    }
    return Decision(desired, reason, state, fields)


# ---------------------------------------------------------------------------------------------
# alternatives for comparison


def _per_instance(m: MinuteMetrics, fleet: FleetCounts) -> float:
    """The tracked metric: in-flight (+ queued, + refused) per instance that reported it."""
    n = m.instances or fleet.in_service
    admitted = m.inflight
    if m.throttled > 0 and m.requests > 0:
        admitted *= (m.requests + m.throttled) / m.requests
    return admitted / max(n, 1)


def _tracked_capacity(m: MinuteMetrics, fleet: FleetCounts, target: float) -> int:
    """``ceil(capacity * metric / target)`` with the capacity that produced the datapoint (the
    datapoint is minutes old: instances launched since have not lowered it yet)."""
    n = m.instances or fleet.in_service
    return math.ceil(n * _per_instance(m, fleet) / target - 1e-9)


def decide_target_tracking(inp: PolicyInput, state: PolicyState, s: ScalingSettings, now: float) -> Decision:
    """AWS-style target tracking on in-flight per instance.

    Scale out when the last 3 one-minute datapoints are above target, scale in when the last 15
    are below 90 % of target; new capacity is ``ceil(in_service * metric / target)``; instances
    still warming up (pending) count toward the current capacity on scale-out.

    >>> s = ScalingSettings(stage="t", asg_name="a")
    >>> m = tuple(MinuteMetrics(t=60 * i, requests=1, inflight=32.0, instances=2) for i in range(3))
    >>> decide_target_tracking(PolicyInput(m, FleetCounts(2, 2)), PolicyState(), s, 180).desired
    4
    """
    fleet, target = inp.fleet, s.target_inflight_per_instance
    metrics = inp.metrics
    desired, reason = fleet.desired, "hold"
    if len(metrics) >= 3 and all(_per_instance(m, fleet) > target for m in metrics[-3:]):
        want = _tracked_capacity(metrics[-1], fleet, target)
        if want > fleet.desired:
            desired, reason = want, "scale-out: metric above target for 3 minutes"
    elif (
        len(metrics) >= 15
        and fleet.pending == 0
        and all(_per_instance(m, fleet) < 0.9 * target for m in metrics[-15:])
    ):
        want = _tracked_capacity(metrics[-1], fleet, target)
        if want < fleet.desired:
            desired, reason = want, "scale-in: metric below 90% of target for 15 minutes"
    desired = apply_bounds(desired, fleet, inp.scheduled_floor)
    fields = {"policy": "target_tracking", "previous_desired": fleet.desired}
    return Decision(desired, reason, state, fields)


def decide_step(inp: PolicyInput, state: PolicyState, s: ScalingSettings, now: float) -> Decision:
    """The seed's step policy: +2 instances when in-flight per instance is above target, -1 when
    below half of it, each at most once per 5-minute cooldown.

    >>> s = ScalingSettings(stage="t", asg_name="a")
    >>> m = (MinuteMetrics(t=0, requests=1, inflight=40.0, instances=2),)
    >>> decide_step(PolicyInput(m, FleetCounts(2, 2)), PolicyState(), s, 60).desired
    4
    """
    fleet, target = inp.fleet, s.target_inflight_per_instance
    desired, reason = fleet.desired, "hold"
    cooldown_s = 300
    last_action = max(state.last_scale_out_t or -1e18, state.last_scale_in_t or -1e18)
    if inp.metrics and now - last_action >= cooldown_s:
        metric = _per_instance(inp.metrics[-1], fleet)
        if metric > target:
            desired, reason = fleet.desired + 2, "scale-out: +2 on high load"
        elif metric < 0.5 * target:
            desired, reason = fleet.desired - 1, "scale-in: -1 on low load"
    desired = apply_bounds(desired, fleet, inp.scheduled_floor)
    if desired > fleet.desired:
        state = replace(state, last_scale_out_t=now)
    elif desired < fleet.desired:
        state = replace(state, last_scale_in_t=now)
    return Decision(desired, reason, state, {"policy": "step", "previous_desired": fleet.desired})


POLICIES = {
    "predictive": decide_predictive,
    "target_tracking": decide_target_tracking,
    "step": decide_step,
}


def decide(policy: str, inp: PolicyInput, state: PolicyState, s: ScalingSettings, now: float) -> Decision:
    """Run the named policy (``ScalingSettings.policy``) on the inputs."""
    return POLICIES[policy](inp, state, s, now)


def scheduled_floor(now: float, windows: Sequence[Any], time_zone: str) -> int:
    """The capacity floor the schedule sets at ``now`` (epoch seconds) in ``time_zone``.

    >>> from chalicelib.scaling_settings import parse_floor_schedule
    >>> w = parse_floor_schedule("mon-fri 08:00-19:00=6; mon-sun 00:00-24:00=2")
    >>> scheduled_floor(1785762000, w, "America/New_York")  # Mon 2026-08-03 09:00 EDT
    6
    >>> scheduled_floor(1785722400, w, "America/New_York")  # Sun 2026-08-02 22:00 EDT
    2
    """
    from datetime import datetime
    from zoneinfo import ZoneInfo

    local = datetime.fromtimestamp(now, ZoneInfo(time_zone))
    minute = local.hour * 60 + local.minute
    floors = [w.floor for w in windows if local.weekday() in w.days and w.start_min <= minute < w.end_min]
    return max(floors, default=0)
