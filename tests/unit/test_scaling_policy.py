"""The scaling policies as pure functions: Hypothesis invariants (bounds and floors, monotone in
demand, no flapping), and the behaviours a fleet owner notices (panic scale-out, pending capacity
counted, slow scale-in, capacity ahead of the daily ramp, business-hours floors)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.scaling import (
    DAY_S,
    POLICIES,
    FleetCounts,
    MinuteMetrics,
    PolicyInput,
    PolicyState,
    decide,
    load_units,
    scheduled_floor,
)
from chalicelib.scaling_settings import ScalingConfigError, ScalingSettings, parse_floor_schedule

S = ScalingSettings(stage="test", asg_name="fleet")
T0 = 1_785_000_000  # a minute boundary


def minutes(loads, start=T0, instances=4, target=S.target_inflight_per_instance):
    """Per-minute metrics whose offered load is ``loads`` instances' worth."""
    return tuple(
        MinuteMetrics(
            t=start + 60 * i, requests=1000.0, inflight=x * target, instances=instances, p99_latency_s=0.1
        )
        for i, x in enumerate(loads)
    )


fleets = st.builds(
    lambda lo, span, d, pend: FleetCounts(
        desired=min(max(d, lo), lo + span),
        in_service=max(0, min(max(d, lo), lo + span) - pend),
        pending=pend,
        min_size=lo,
        max_size=lo + span,
    ),
    st.integers(0, 5),
    st.integers(0, 40),
    st.integers(0, 50),
    st.integers(0, 3),
)
loads = st.lists(st.floats(0, 200, allow_nan=False), min_size=0, max_size=30)


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from(sorted(POLICIES)), fleet=fleets, load=loads, floor=st.integers(0, 60))
def test_desired_is_always_within_min_max_and_floor(policy, fleet, load, floor):
    d = decide(policy, PolicyInput(minutes(load), fleet, floor), PolicyState(), S, T0 + 3600)
    assert d.desired <= fleet.max_size
    assert d.desired >= min(max(fleet.min_size, floor), fleet.max_size)


@settings(max_examples=150, deadline=None)
@given(
    fleet=fleets, load=loads.filter(bool), extra=st.floats(0, 100, allow_nan=False), floor=st.integers(0, 10)
)
def test_more_demand_never_lowers_desired_capacity(fleet, load, extra, floor):
    now = T0 + 3600
    low = decide("predictive", PolicyInput(minutes(load), fleet, floor), PolicyState(), S, now)
    more = [x + extra for x in load]
    high = decide("predictive", PolicyInput(minutes(more), fleet, floor), PolicyState(), S, now)
    assert high.desired >= low.desired


def run_constant(policy: str, load: float, start_desired: int, minutes_n: int = 180, boot_min: int = 4):
    """Drive a policy minute by minute against a fleet whose new instances take ``boot_min``."""
    fleet = FleetCounts(desired=start_desired, in_service=start_desired, min_size=1, max_size=60)
    state, history, booting = PolicyState(), [], []
    for i in range(minutes_n):
        now = T0 + 60 * i
        ready_now = fleet.in_service + sum(1 for b in booting if b <= i)
        booting = [b for b in booting if b > i]
        window = minutes([load] * 30, start=now - 60 * 31, instances=max(ready_now, 1))
        fleet = replace(fleet, in_service=ready_now, pending=len(booting))
        d = decide(policy, PolicyInput(window, fleet, 0), state, S, now)
        state = d.state
        if d.desired > fleet.desired:
            booting += [i + boot_min] * (d.desired - fleet.desired)
        elif d.desired < fleet.desired:
            drop = fleet.desired - d.desired
            cancel = min(drop, len(booting))
            booting = booting[cancel:]
            fleet = replace(fleet, in_service=fleet.in_service - (drop - cancel))
        fleet = replace(fleet, desired=d.desired, pending=len(booting))
        history.append(d.desired)
    return history


def direction_changes(xs):
    moves = [b - a for a, b in zip(xs, xs[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if (a > 0) != (b > 0))


@settings(max_examples=40, deadline=None)
@given(load=st.floats(0.5, 40, allow_nan=False), start=st.integers(1, 50))
def test_no_flapping_under_constant_demand(load, start):
    history = run_constant("predictive", load, start)
    assert direction_changes(history) == 0  # converges monotonically, never oscillates
    assert len(set(history[-60:])) == 1  # and then holds
    # at the level plus the fixed part of the headroom (a constant load has no noise)
    assert history[-1] == max(1, math.ceil(load + S.headroom_min_instances - 1e-9))


def test_panic_mode_scales_out_at_once_and_pending_capacity_counts():
    fleet = FleetCounts(desired=4, in_service=4, min_size=1, max_size=40)
    hot = minutes([4.0] * 10 + [12.0], instances=4)  # 3x the target all of a sudden
    d = decide("predictive", PolicyInput(hot, fleet, 0), PolicyState(), S, T0 + 660)
    # sized for the newest minute (the window's mean would lag the jump), plus headroom
    assert 12 < d.desired <= 18 and d.reason == "panic scale-out: latest minute"
    # the next minute the new instances are still booting: the same metrics order nothing more
    booting = FleetCounts(desired=d.desired, in_service=4, pending=d.desired - 4, min_size=1, max_size=40)
    again = decide("predictive", PolicyInput(hot, booting, 0), d.state, S, T0 + 720)
    assert again.desired == d.desired


def test_scale_in_is_stabilized_and_stepped():
    fleet = FleetCounts(desired=20, in_service=20, min_size=1, max_size=40)
    state = PolicyState()
    sizes = []
    for i in range(40):
        d = decide(
            "predictive",
            PolicyInput(minutes([2.0] * 20, instances=fleet.in_service), fleet, 0),
            state,
            S,
            T0 + 60 * i,
        )
        state, fleet = d.state, replace(fleet, desired=d.desired, in_service=d.desired)
        sizes.append(d.desired)
    # at most 10 % a minute, down to the need (the level and the fixed headroom)
    assert sizes[0] == 18 and sizes[-1] == math.ceil(2.0 + S.headroom_min_instances)
    assert all(b <= a for a, b in zip(sizes, sizes[1:], strict=False))


def test_recent_peak_holds_scale_in_for_the_stabilization_window():
    fleet = FleetCounts(desired=10, in_service=10, min_size=1, max_size=40)
    busy = decide("predictive", PolicyInput(minutes([10.0] * 10), fleet, 0), PolicyState(), S, T0)
    quiet = minutes([1.0] * 30, start=T0 + 60)
    later = decide(
        "predictive", PolicyInput(quiet, fleet, 0), busy.state, S, T0 + S.scale_in_stabilization_s - 60
    )
    assert later.desired == 10  # the busy minute is still inside the window
    after = decide(
        "predictive", PolicyInput(quiet, fleet, 0), later.state, S, T0 + S.scale_in_stabilization_s + 60
    )
    assert after.desired < 10


def test_forecast_brings_capacity_before_the_daily_ramp():
    """Seven days with a 09:00 ramp to 12 instances: at 08:55 today, with load still at 2, the
    policy already orders the ramp's capacity (a boot takes minutes)."""
    state = PolicyState()
    fleet = FleetCounts(desired=2, in_service=2, min_size=1, max_size=40)
    day0 = T0 - T0 % DAY_S
    for day in range(7):
        for minute in range(8 * 60, 10 * 60):
            t = day0 + day * DAY_S + minute * 60
            load = 12.0 if minute >= 9 * 60 else 2.0
            state = decide(
                "predictive", PolicyInput(minutes([load], start=t), fleet, 0), state, S, t + 120
            ).state
    now = day0 + 7 * DAY_S + (8 * 60 + 55) * 60
    today = minutes([2.0] * 20, start=now - 22 * 60)
    d = decide("predictive", PolicyInput(today, fleet, 0), state, S, now)
    assert d.desired >= 12 and "forecast" in d.reason
    reactive_only = replace(S, forecast_days=0)
    flat = decide("predictive", PolicyInput(today, fleet, 0), state, reactive_only, now)
    assert flat.desired == math.ceil(2.0 + S.headroom_min_instances)


def test_headroom_follows_the_observed_noise_not_the_level():
    """Same mean load: a bursty window gets more capacity than a smooth one; a high, smooth load
    gets far less than a fixed +20 % would add."""
    fleet = FleetCounts(desired=1, in_service=1, min_size=1, max_size=60)
    now = T0 + 1860

    def need(loads):
        return decide("predictive", PolicyInput(minutes(loads), fleet, 0), PolicyState(), S, now).desired

    smooth, bursty = [4.0] * 30, [2.0, 6.0] * 15
    assert need(bursty) > need(smooth) == math.ceil(4.0 + S.headroom_min_instances)
    assert need([30.0] * 30) == 31  # +20 % would be 36
    # the noise estimate ignores a slow drift of the level: a steady ramp is not "noise"
    ramp = [10.0 + 0.2 * i for i in range(30)]
    assert need(ramp) <= math.ceil(max(ramp) + S.headroom_min_instances + S.headroom_z * 0.2)


def test_a_rise_in_the_last_minutes_raises_capacity_before_the_half_hour_mean_does():
    fleet = FleetCounts(desired=3, in_service=3, min_size=1, max_size=60)
    rising = [2.0] * 20 + [8.0] * 10  # the half-hour mean is 4, the last 10 minutes 8
    d = decide("predictive", PolicyInput(minutes(rising), fleet, 0), PolicyState(), S, T0 + 1860)
    assert d.desired >= 9 and d.fields["load_level"] == 8.0


def test_level_window_keeps_its_old_environment_name():
    base = {"INFERENCE_ASG_NAME": "g"}
    assert ScalingSettings.from_env({**base, "SCALING_SCALE_OUT_LOOKBACK_S": "120"}).level_window_s == 120
    both = {**base, "SCALING_SCALE_OUT_LOOKBACK_S": "120", "SCALING_LEVEL_WINDOW_S": "900"}
    assert ScalingSettings.from_env(both).level_window_s == 900
    s = ScalingSettings.from_env({**base, "SCALING_HEADROOM_Z": "3", "SCALING_HEADROOM_MIN_INSTANCES": "0"})
    assert (s.headroom_z, s.headroom_min_instances) == (3.0, 0.0)


def test_missing_metrics_never_scale_a_serving_fleet_in():
    fleet = FleetCounts(desired=8, in_service=8, min_size=1, max_size=40)
    d = decide("predictive", PolicyInput((), fleet, 0), PolicyState(), S, T0)
    assert d.desired == 8 and "no metrics" in d.reason


def test_throttled_requests_count_as_demand():
    m = MinuteMetrics(t=T0, requests=500, throttled=1500, inflight=32.0, instances=4)
    assert load_units(m, 8.0) == 16.0


def test_target_tracking_waits_for_three_datapoints_and_step_adds_two():
    fleet = FleetCounts(desired=4, in_service=4, min_size=1, max_size=40)
    two_hot = minutes([4.0, 8.0, 8.0])
    assert decide("target_tracking", PolicyInput(two_hot, fleet, 0), PolicyState(), S, T0).desired == 4
    three_hot = minutes([8.0, 8.0, 8.0])
    assert decide("target_tracking", PolicyInput(three_hot, fleet, 0), PolicyState(), S, T0).desired == 8
    assert decide("step", PolicyInput(three_hot, fleet, 0), PolicyState(), S, T0).desired == 6


def test_state_round_trips_through_json():
    import json

    fleet = FleetCounts(desired=2, in_service=2)
    d = decide("predictive", PolicyInput(minutes([3.0] * 5), fleet, 0), PolicyState(), S, T0 + 600)
    back = PolicyState.from_dict(json.loads(json.dumps(d.state.to_dict())))
    assert back == d.state
    # a state stored by the previous version (seasonal entries with the slot's peak) still loads
    old = {"recent": [[T0, 3]], "seasonal": [[7, 4.5, 30.0, 10]], "last_metric_t": T0}
    assert PolicyState.from_dict(old).seasonal == ((7, 30.0, 10),)


@pytest.mark.parametrize(
    ("iso", "floor"),
    [
        ("2026-03-09T08:30:00-04:00", 6),  # Monday after the DST switch, 08:30 EDT
        ("2026-03-06T08:30:00-05:00", 6),  # Friday before it, 08:30 EST
        ("2026-03-06T07:59:00-05:00", 1),
        ("2026-03-07T12:00:00-05:00", 3),  # Saturday
        ("2026-03-07T20:00:00-05:00", 1),
    ],
)
def test_floor_schedule_in_local_time_across_dst(iso, floor):
    from datetime import datetime

    windows = parse_floor_schedule("mon-fri 08:00-19:00=6; sat-sun 10:00-16:00=3; mon-sun 00:00-24:00=1")
    assert scheduled_floor(datetime.fromisoformat(iso).timestamp(), windows, "America/New_York") == floor


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({}, "INFERENCE_ASG_NAME"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_MAX_SIZE": "x"}, "SCALING_MAX_SIZE"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_TIME_ZONE": "Mars/Olympus"}, "SCALING_TIME_ZONE"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_FLOOR_SCHEDULE": "weekdays=4"}, "SCALING_FLOOR_SCHEDULE"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_POLICY": "magic"}, "SCALING_POLICY"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_MIN_SIZE": "9", "SCALING_MAX_SIZE": "3"}, "SCALING_MIN_SIZE"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_HEADROOM_Z": "lots"}, "SCALING_HEADROOM_Z"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_LEVEL_WINDOW_S": "0"}, "SCALING_LEVEL_WINDOW_S"),
        ({"INFERENCE_ASG_NAME": "g", "SCALING_METRICS_WINDOW_S": "600"}, "SCALING_METRICS_WINDOW_S"),
    ],
)
def test_settings_fail_fast_naming_the_key(env, key):
    with pytest.raises(ScalingConfigError, match=key):
        ScalingSettings.from_env(env)
