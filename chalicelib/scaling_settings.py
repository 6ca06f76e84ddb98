"""Settings of the inference fleet's autoscaler, read once from the Lambda's environment.

``ScalingSettings.from_env(mapping)`` returns a frozen dataclass and fails fast naming the bad
key, so tests hand it a plain dict. Units are in the names.

Example:
    >>> s = ScalingSettings.from_env({"STAGE": "dev", "INFERENCE_ASG_NAME": "fleet"})
    >>> (s.asg_name, s.target_inflight_per_instance, s.boot_delay_s)
    ('fleet', 8.0, 240)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class ScalingConfigError(ValueError):
    """A scaling setting is missing or malformed (the message names the key)."""


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "")
    if raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ScalingConfigError(f"{key}={raw!r} is not a boolean")


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class FloorWindow:
    """A capacity floor that holds on ``days`` (0=Monday) from ``start_min`` to ``end_min``
    (minutes after local midnight, end exclusive)."""

    days: frozenset[int]
    start_min: int
    end_min: int
    floor: int


def parse_floor_schedule(text: str) -> tuple[FloorWindow, ...]:
    """Parse ``"mon-fri 08:00-19:00=6; sat-sun 10:00-16:00=3"`` into floor windows.

    >>> w = parse_floor_schedule("mon-fri 08:00-19:00=6")[0]
    >>> (sorted(w.days), w.start_min, w.end_min, w.floor)
    ([0, 1, 2, 3, 4], 480, 1140, 6)
    """
    windows = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        m = re.fullmatch(
            r"(?P<d1>[a-z]{3})(?:-(?P<d2>[a-z]{3}))?\s+(?P<h1>\d\d):(?P<m1>\d\d)-(?P<h2>\d\d):(?P<m2>\d\d)"
            r"\s*=\s*(?P<n>\d+)",
            part.lower(),
        )
        if not m or m["d1"] not in _DAYS or (m["d2"] and m["d2"] not in _DAYS):
            raise ScalingConfigError(f"SCALING_FLOOR_SCHEDULE: cannot parse {part!r}")
        d1 = _DAYS.index(m["d1"])
        d2 = _DAYS.index(m["d2"]) if m["d2"] else d1
        days = frozenset(range(d1, d2 + 1)) if d1 <= d2 else frozenset([*range(d1, 7), *range(0, d2 + 1)])
        start, end = int(m["h1"]) * 60 + int(m["m1"]), int(m["h2"]) * 60 + int(m["m2"])
        if not (0 <= start < end <= 24 * 60):
            raise ScalingConfigError(f"SCALING_FLOOR_SCHEDULE: bad hours in {part!r}")
        windows.append(FloorWindow(days, start, end, int(m["n"])))
    return tuple(windows)


@dataclass(frozen=True)
class ScalingSettings:
    stage: str
    asg_name: str
    policy: str = "predictive"  # predictive | target_tracking | step
    min_size: int = 1
    max_size: int = 40
    # target tracking on in-flight requests per instance (the server's concurrency at the SLO
    # times the utilisation we aim for)
    target_inflight_per_instance: float = 8.0
    latency_slo_p99_s: float = 0.5
    panic_ratio: float = 1.5  # load above panic_ratio x ready capacity: scale out at once
    # scale-in only to the highest need of this window, by at most this fraction per minute
    scale_in_stabilization_s: int = 600
    scale_in_max_step_fraction: float = 0.1
    # the expected load: the mean of the last level_window_s, or of the last
    # level_short_window_s when that is higher (a ramp shows there first)
    level_window_s: int = 1800
    level_short_window_s: int = 600
    # the metrics each decision reads (the level's and the noise's window; the seasonal memory is
    # in the policy's state). A compressed replay shortens it with the rest of its clock.
    metrics_window_s: int = 1800
    # headroom above it for the minutes a decision covers: headroom_z standard deviations of the
    # per-minute noise observed in the metrics window, plus headroom_min_instances (a fixed part:
    # a quiet window says little about the next burst). The four were chosen on 1995-07-01..14 of
    # the NASA trace only (bench/autoscale_sim.py): cheap, with margin under 0.5 % of minutes
    # under-provisioned.
    headroom_z: float = 1.625
    headroom_min_instances: float = 0.5
    boot_delay_s: int = 240  # launch + model download + warm-up until /readyz
    metric_delay_s: int = 60
    period_s: int = 60
    # seasonality: floor from the same time of day on previous days
    forecast_days: int = 7
    forecast_slot_s: int = 900
    forecast_quantile: float = 0.5
    forecast_weight: float = 1.0
    forecast_level_adjust: bool = True
    # schedules
    floor_schedule: tuple[FloorWindow, ...] = ()
    time_zone: str = "UTC"
    # lifecycle
    warmup_limit_s: int = 900
    drain_limit_s: int = 600
    metrics_namespace: str = "nlpfleet"
    active_model_param: str = ""
    state_table: str = ""
    dry_run: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ScalingSettings:
        def get(key: str, default: str | None = None) -> str:
            value = env.get(key, default)
            if value is None or value == "":
                raise ScalingConfigError(f"{key} is required")
            return value

        def num(key: str, default: float, kind: type = int) -> float:
            raw = env.get(key)
            if raw in (None, ""):
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ScalingConfigError(f"{key}={raw!r} is not a {kind.__name__}") from None
            if value < 0:
                raise ScalingConfigError(f"{key}={raw!r} must not be negative")
            return value

        stage = get("STAGE", "dev")
        tz = env.get("SCALING_TIME_ZONE", "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScalingConfigError(f"SCALING_TIME_ZONE={tz!r} is not a known time zone") from None
        policy = env.get("SCALING_POLICY", "predictive")
        if policy not in ("predictive", "target_tracking", "step"):
            raise ScalingConfigError(f"SCALING_POLICY={policy!r}: predictive, target_tracking or step")
        s = cls(
            stage=stage,
            asg_name=get("INFERENCE_ASG_NAME"),
            policy=policy,
            min_size=int(num("SCALING_MIN_SIZE", 1)),
            max_size=int(num("SCALING_MAX_SIZE", 40)),
            target_inflight_per_instance=num("SCALING_TARGET_INFLIGHT_PER_INSTANCE", 8.0, float),
            latency_slo_p99_s=num("SCALING_LATENCY_SLO_P99_S", 0.5, float),
            panic_ratio=num("SCALING_PANIC_RATIO", 1.5, float),
            scale_in_stabilization_s=int(
                num("SCALING_SCALE_IN_STABILIZATION_S", ScalingSettings.scale_in_stabilization_s)
            ),
            scale_in_max_step_fraction=num("SCALING_SCALE_IN_MAX_STEP_FRACTION", 0.1, float),
            boot_delay_s=int(num("SCALING_BOOT_DELAY_S", 240)),
            forecast_days=int(num("SCALING_FORECAST_DAYS", 7)),
            forecast_weight=num("SCALING_FORECAST_WEIGHT", 1.0, float),
            forecast_quantile=num("SCALING_FORECAST_QUANTILE", 0.5, float),
            forecast_level_adjust=_flag(env, "SCALING_FORECAST_LEVEL_ADJUST", True),
            # SCALING_SCALE_OUT_LOOKBACK_S: the older name of the same look-back window
            level_window_s=int(
                num(
                    "SCALING_LEVEL_WINDOW_S",
                    num("SCALING_SCALE_OUT_LOOKBACK_S", ScalingSettings.level_window_s),
                )
            ),
            level_short_window_s=int(
                num("SCALING_LEVEL_SHORT_WINDOW_S", ScalingSettings.level_short_window_s)
            ),
            metrics_window_s=int(num("SCALING_METRICS_WINDOW_S", ScalingSettings.metrics_window_s)),
            headroom_z=num("SCALING_HEADROOM_Z", ScalingSettings.headroom_z, float),
            headroom_min_instances=num(
                "SCALING_HEADROOM_MIN_INSTANCES", ScalingSettings.headroom_min_instances, float
            ),
            floor_schedule=parse_floor_schedule(env.get("SCALING_FLOOR_SCHEDULE", "")),
            time_zone=tz,
            warmup_limit_s=int(num("SCALING_WARMUP_LIMIT_S", 900)),
            drain_limit_s=int(num("SCALING_DRAIN_LIMIT_S", 600)),
            metrics_namespace=env.get("SCALING_METRICS_NAMESPACE", "nlpfleet"),
            active_model_param=env.get("ACTIVE_MODEL_PARAM", f"/nlpfleet/{stage}/active-model"),
            state_table=env.get("SCALING_STATE_TABLE", f"nlpfleet-{stage}-scaling"),
            dry_run=_flag(env, "DRY_RUN", False),
        )
        if s.min_size > s.max_size:
            raise ScalingConfigError("SCALING_MIN_SIZE must not exceed SCALING_MAX_SIZE")
        if s.level_window_s < 60:
            raise ScalingConfigError(
                "SCALING_LEVEL_WINDOW_S (or SCALING_SCALE_OUT_LOOKBACK_S) must be at least 60"
            )
        if s.metrics_window_s < s.level_window_s:
            raise ScalingConfigError(
                f"SCALING_METRICS_WINDOW_S={s.metrics_window_s} is shorter than the level window "
                f"({s.level_window_s} s: SCALING_LEVEL_WINDOW_S)"
            )
        if s.target_inflight_per_instance <= 0:
            raise ScalingConfigError("SCALING_TARGET_INFLIGHT_PER_INSTANCE must be positive")
        return s
