"""Trace-driven evaluation of the inference fleet's scaling policies.

Replays a per-minute request trace (any CSV with ``unix_time`` and ``requests`` columns; by default
the real NASA-HTTP July 1995 trace) minute by minute against a simulated Auto Scaling Group and
compares, side by side in one run:

* ``static``      provisioning for the peak all the time;
* ``step``        the seed's step policy (+2 on high load);
* ``target_tracking`` AWS-style target tracking;
* ``predictive``  this project's policy;
* ``oracle``      the cheapest schedule that always has the needed capacity ready, knowing the
                  future; every launch is billed for its boot delay before it serves.

The three reactive policies are the very functions the scaling Lambda runs
(``chalicelib.scaling.decide``), fed the metrics the agents would publish: CloudWatch's metric
delay and the Lambda's one-minute period are modelled, and a launched instance serves only after
the boot + warm-up delay (billed from launch).

Model of one instance: it serves ``--capacity-rps`` requests per second within the latency SLO
(default 50: a placeholder for the inference server benchmark's measured number; pass the
measured one). Latency at low load ``--service-time-s`` (Little's law gives in-flight requests
= throughput x latency). The trace is scaled so that its peak minute needs ``--peak-instances``.

Prints instance-hours (cost), the ratio to the oracle, and the share of minutes where demand
exceeded ready capacity (SLO misses); writes a PNG of demand, ready and desired capacity over time
for each policy and a JSON of the table.

    python bench/autoscale_sim.py                              # July, whole month
    python bench/autoscale_sim.py --until 1995-07-15           # the tuning half
    python bench/autoscale_sim.py --split 1995-07-15           # whole month + both halves
    python bench/autoscale_sim.py --trace other.csv --capacity-rps 120
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chalicelib.scaling import (  # noqa: E402
    POLICIES,
    Decision,
    FleetCounts,
    MinuteMetrics,
    PolicyInput,
    PolicyState,
    apply_bounds,
    decide,
    load_units,
)
from chalicelib.scaling_settings import ScalingSettings  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "data" / "nasa_http_jul95" / "requests_per_minute.csv"


@dataclass(frozen=True)
class SimConfig:
    capacity_rps: float = 50.0
    service_time_s: float = 0.2
    peak_instances: int = 20
    boot_min: int = 4
    metric_delay_min: int = 1
    period_min: int = 1
    window_min: int = 30
    target_utilization: float = 0.95
    # AWS-style target tracking is shown at these utilizations (the first is also the step
    # policy's): the project's target, and one low enough to approach its miss rate
    tt_utilizations: tuple[float, ...] = (0.95, 0.5)
    max_size: int = 40
    min_size: int = 1


def load_trace(
    path: Path, since: str | None = None, until: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(unix_time, requests) per minute, optionally cut to ``[since, until)`` (UTC dates)."""
    times, reqs = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            times.append(int(float(row["unix_time"])))
            reqs.append(float(row["requests"]))
    t, r = np.array(times, dtype=np.int64), np.array(reqs, dtype=float)
    if since:
        keep = t >= datetime.fromisoformat(since).replace(tzinfo=UTC).timestamp()
        t, r = t[keep], r[keep]
    if until:
        keep = t < datetime.fromisoformat(until).replace(tzinfo=UTC).timestamp()
        t, r = t[keep], r[keep]
    return t, r


def scale_factor(requests: np.ndarray, cfg: SimConfig) -> float:
    """Multiply the trace so that its peak minute needs ``peak_instances`` instances."""
    return cfg.peak_instances * cfg.capacity_rps * 60.0 / max(float(requests.max()), 1.0)


def needed_instances(demand_rpm: np.ndarray, cfg: SimConfig) -> np.ndarray:
    return np.ceil(demand_rpm / (cfg.capacity_rps * 60.0) - 1e-9).astype(int)


def oracle(needed: np.ndarray, boot_min: int) -> tuple[np.ndarray, float]:
    """Ready capacity of the cheapest schedule with ``ready >= needed`` every minute, and its
    instance-minutes. Capacity levels are independent: level ``k`` must be ready on the minutes
    where ``needed >= k``; between two such runs it is kept through a gap shorter than a boot
    (cost = gap) and relaunched otherwise (cost = one boot). Levels ready at minute 0 start warm.
    """
    n = len(needed)
    ready = np.zeros(n, dtype=int)
    cost = 0.0
    for k in range(1, int(needed.max(initial=0)) + 1):
        on = needed >= k
        idx = np.flatnonzero(on)
        if idx.size == 0:
            continue
        cost += idx.size
        level = on.copy()
        if idx[0] > 0:
            cost += boot_min  # first launch of this level
        gaps = np.diff(idx) - 1
        for start, g in zip(idx[:-1], gaps, strict=True):
            if g <= 0:
                continue
            if g < boot_min:
                cost += g
                level[start + 1 : start + 1 + g] = True
            else:
                cost += boot_min
        ready += level
    return ready, float(cost)


@dataclass
class Run:
    name: str
    ready: np.ndarray
    desired: np.ndarray
    billed: np.ndarray  # instances billed per minute (ready + booting)

    @property
    def instance_minutes(self) -> float:
        return float(self.billed.sum())


def simulate(
    policy: str, t: np.ndarray, demand: np.ndarray, cfg: SimConfig, settings: ScalingSettings
) -> Run:
    """Replay ``demand`` (requests per minute) against a simulated ASG driven by ``policy``."""
    n = len(t)
    cap_rpm = cfg.capacity_rps * 60.0
    start = max(int(needed_instances(demand[:1], cfg)[0]), cfg.min_size)
    ready_n = start
    boots: list[int] = []  # minute at which each pending instance becomes ready
    desired = start
    state = PolicyState()
    metrics: list[MinuteMetrics] = []
    ready_arr = np.zeros(n, dtype=int)
    desired_arr = np.zeros(n, dtype=int)
    billed = np.zeros(n, dtype=int)
    for i in range(n):
        # instances whose boot + warm-up completed join
        joined = sum(1 for b in boots if b <= i)
        if joined:
            boots = [b for b in boots if b > i]
            ready_n += joined
        # the policy Lambda runs at the start of the minute on what CloudWatch has by then
        if i % cfg.period_min == 0 and i > 0:
            visible = metrics[: max(0, i - cfg.metric_delay_min)]
            window = tuple(visible[-cfg.window_min :])
            fleet = FleetCounts(
                desired=desired,
                in_service=ready_n,
                pending=len(boots),
                min_size=cfg.min_size,
                max_size=cfg.max_size,
            )
            d = decide(policy, PolicyInput(window, fleet, 0), state, settings, float(t[i]))
            state = d.state
            new_desired = d.desired
            current = ready_n + len(boots)
            if new_desired > current:
                boots += [i + cfg.boot_min] * (new_desired - current)
            elif new_desired < current:
                drop = current - new_desired
                # the ASG cancels instances still booting before draining ready ones
                cancel = min(drop, len(boots))
                boots = sorted(boots)[: len(boots) - cancel]
                ready_n -= drop - cancel
            desired = new_desired
        billed[i] = ready_n + len(boots)
        ready_arr[i] = ready_n
        desired_arr[i] = desired
        # this minute's traffic against ready capacity -> what the agents publish
        served = min(demand[i], ready_n * cap_rpm)
        throttled = demand[i] - served
        saturated = throttled > 0
        metrics.append(
            MinuteMetrics(
                t=int(t[i]),
                requests=served,
                throttled=throttled,
                inflight=served / 60.0 * cfg.service_time_s,
                queue_depth=0.0,
                p99_latency_s=(settings.latency_slo_p99_s * 2 if saturated else cfg.service_time_s * 1.5),
                instances=ready_n,
            )
        )
    return Run(policy, ready_arr, desired_arr, billed)


def decide_peak_rule(inp: PolicyInput, state: PolicyState, s: ScalingSettings, now: float) -> Decision:
    """The issue's calibration baseline (not a product policy): the peak of the last 30 visible
    minutes plus 20 % headroom, in instances at full capacity (run it with utilization 1.0)."""
    peak = max((load_units(m, s.target_inflight_per_instance) for m in inp.metrics[-30:]), default=0.0)
    desired = apply_bounds(math.ceil(peak * 1.2 - 1e-9), inp.fleet, inp.scheduled_floor)
    return Decision(desired, "peak of 30 min + 20 %", state, {})


POLICIES.setdefault("peak30+20%", decide_peak_rule)


def settings_for(cfg: SimConfig, **overrides) -> ScalingSettings:
    """The Lambda's settings for the simulated fleet: target in-flight = utilization x concurrency."""
    concurrency = cfg.capacity_rps * cfg.service_time_s
    base = ScalingSettings(
        stage="sim",
        asg_name="sim",
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        target_inflight_per_instance=cfg.target_utilization * concurrency,
        boot_delay_s=cfg.boot_min * 60,
        metric_delay_s=cfg.metric_delay_min * 60,
        period_s=cfg.period_min * 60,
    )
    return replace(base, **overrides)


def evaluate(t: np.ndarray, requests: np.ndarray, cfg: SimConfig, split: str | None = None) -> dict:
    factor = scale_factor(requests, cfg)
    demand = requests * factor
    need = needed_instances(demand, cfg)
    runs: dict[str, Run] = {}
    peak = int(need.max())
    runs["static"] = Run("static", np.full(len(t), peak), np.full(len(t), peak), np.full(len(t), peak))
    runs["step"] = simulate(
        "step", t, demand, cfg, settings_for(replace(cfg, target_utilization=cfg.tt_utilizations[0]))
    )
    for u in cfg.tt_utilizations:
        tt_cfg = replace(cfg, target_utilization=u)
        runs[f"target_tracking@{u:g}"] = simulate("target_tracking", t, demand, tt_cfg, settings_for(tt_cfg))
    full = replace(cfg, target_utilization=1.0)
    runs["peak30+20%"] = simulate("peak30+20%", t, demand, full, settings_for(full))
    runs["predictive"] = simulate("predictive", t, demand, cfg, settings_for(cfg))
    o_ready, _ = oracle(need, cfg.boot_min)
    runs["oracle"] = Run("oracle", o_ready, o_ready, o_ready)  # its boots are billed in table()
    segments = {}
    for label, seg in segment_slices(t, split):
        segments[label] = table(runs, need, seg, cfg.boot_min)
    return {
        "scale_factor": factor,
        "need": need,
        "demand": demand,
        "runs": runs,
        "table": table(runs, need, slice(None), cfg.boot_min),
        "segments": segments,
    }


def segment_slices(t: np.ndarray, split: str | None) -> list[tuple[str, slice]]:
    """``[start, split)`` and ``[split, end)`` of the run (UTC date), to report a tuning part and
    a held-out part of one replay: same scale factor, policy state carried across the split."""
    if not split:
        return []
    cut = int(np.searchsorted(t, datetime.fromisoformat(split).replace(tzinfo=UTC).timestamp()))
    if not 0 < cut < len(t):
        raise ValueError(f"--split {split} is outside the replayed trace")
    day = lambda i: datetime.fromtimestamp(int(t[i]), UTC).date().isoformat()  # noqa: E731
    return [
        (f"{day(0)}..{day(cut - 1)}", slice(0, cut)),
        (f"{day(cut)}..{day(len(t) - 1)}", slice(cut, None)),
    ]


def table(runs: dict[str, Run], need: np.ndarray, seg: slice, boot_min: int) -> dict[str, dict]:
    """Instance-hours, ratio to the oracle and minutes under-provisioned over ``seg``; the oracle
    is the cheapest schedule for ``need[seg]`` alone (every launch billed for its boot)."""
    _, o_cost = oracle(need[seg], boot_min)
    rows = {}
    for name, r in runs.items():
        minutes = o_cost if name == "oracle" else float(r.billed[seg].sum())
        rows[name] = {
            "instance_hours": round(minutes / 60.0, 1),
            "vs_oracle": round(minutes / o_cost, 3),
            "under_provisioned_pct": round(100.0 * float(np.mean(need[seg] > r.ready[seg])), 3),
        }
    return rows


def plot(t: np.ndarray, result: dict, out: Path, title: str, days: tuple[float, float] | None = None) -> None:
    """Demand (needed instances), ready and desired capacity over time, one panel per policy;
    ``days`` zooms into ``[start, end)`` days since the start of the trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["runs"] if n != "static"]
    fig, axes = plt.subplots(len(names), 1, figsize=(14, 2.4 * len(names)), sharex=True)
    x = (t - t[0]) / 86400.0
    sel = slice(None) if days is None else (x >= days[0]) & (x < days[1])
    for ax, name in zip(axes, names, strict=True):
        r = result["runs"][name]
        row = result["table"][name]
        ax.step(x[sel], result["need"][sel], where="post", color="0.55", lw=0.5, label="needed (demand)")
        ax.step(x[sel], r.ready[sel], where="post", color="tab:blue", lw=0.9, label="ready")
        ax.step(x[sel], r.desired[sel], where="post", color="tab:orange", lw=0.6, ls="--", label="desired")
        ax.set_ylabel("instances")
        ax.set_title(
            f"{name}: {row['instance_hours']} instance-h ({row['vs_oracle']}x oracle), "
            f"{row['under_provisioned_pct']}% minutes under-provisioned (whole run)",
            fontsize=9,
        )
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("days since start of trace")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="per-minute CSV: unix_time,requests")
    p.add_argument("--since", help="first UTC date to replay (YYYY-MM-DD)")
    p.add_argument("--until", help="UTC date to stop before (YYYY-MM-DD)")
    p.add_argument(
        "--split",
        help="also report [start, SPLIT) and [SPLIT, end) of the same replay (UTC date), e.g. the "
        "tuning and held-out halves",
    )
    p.add_argument(
        "--capacity-rps", type=float, default=50.0, help="requests/s one instance serves within SLO"
    )
    p.add_argument("--service-time-s", type=float, default=0.2)
    p.add_argument("--peak-instances", type=int, default=20)
    p.add_argument("--boot-min", type=int, default=4, help="boot + warm-up before an instance serves")
    p.add_argument("--metric-delay-min", type=int, default=1)
    p.add_argument(
        "--target-utilization",
        type=float,
        default=0.95,
        help="the policies' target in-flight per instance as a share of what one instance holds at the SLO",
    )
    p.add_argument("--tt-utilizations", default="0.95,0.5", help="target tracking is shown at each of these")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "autoscale.png")
    p.add_argument("--json", type=Path, default=None, help="write the table here (default: beside --out)")
    p.add_argument(
        "--zoom-days",
        default="11.5,13.5",
        help="also plot this window (days since the start) to OUT_zoom.png; empty for none",
    )
    args = p.parse_args(argv)
    cfg = SimConfig(
        capacity_rps=args.capacity_rps,
        service_time_s=args.service_time_s,
        peak_instances=args.peak_instances,
        boot_min=args.boot_min,
        metric_delay_min=args.metric_delay_min,
        target_utilization=args.target_utilization,
        tt_utilizations=tuple(float(x) for x in args.tt_utilizations.split(",")),
        max_size=max(40, 2 * args.peak_instances),
    )
    t, req = load_trace(args.trace, args.since, args.until)
    try:
        segment_slices(t, args.split)
    except ValueError as e:
        p.error(str(e))
    started = time.perf_counter()
    result = evaluate(t, req, cfg, args.split)
    elapsed = time.perf_counter() - started
    print(
        f"trace {args.trace.name}: {len(t)} minutes, scale x{result['scale_factor']:.2f}, "
        f"peak {int(result['need'].max())} instances, boot {cfg.boot_min} min, "
        f"capacity {cfg.capacity_rps:g} req/s/instance ({elapsed:.1f}s)"
    )
    for label, rows in [("whole run", result["table"]), *result["segments"].items()]:
        print(f"{label}:")
        print(f"  {'policy':<24}{'instance-h':>12}{'x oracle':>10}{'under-prov %':>14}")
        for name, row in rows.items():
            print(
                f"  {name:<24}{row['instance_hours']:>12}{row['vs_oracle']:>10}"
                f"{row['under_provisioned_pct']:>14}"
            )
    title = f"{args.trace.parent.name}/{args.trace.name} {args.since or ''}..{args.until or ''}"
    plot(t, result, args.out, title)
    if args.zoom_days:
        lo, hi = (float(v) for v in args.zoom_days.split(","))
        plot(
            t,
            result,
            args.out.with_name(args.out.stem + "_zoom.png"),
            f"{title} (days {lo:g}-{hi:g})",
            (lo, hi),
        )
    out_json = args.json or args.out.with_suffix(".json")
    doc = {
        "trace": str(args.trace.name),
        "since": args.since,
        "until": args.until,
        "split": args.split,
        "minutes": len(t),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
        "predictive_settings": {
            k: v
            for k, v in settings_for(cfg).__dict__.items()
            if k not in ("floor_schedule", "stage", "asg_name")
        },
        "scale_factor": result["scale_factor"],
        "table": result["table"],
        "segments": result["segments"],
    }
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} and {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
