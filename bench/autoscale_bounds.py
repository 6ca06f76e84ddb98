"""How cheap could any scaling policy be on a trace, given what it knows? Two reference points for
``bench/autoscale_sim.py``'s table (same trace, same scaling, same oracle):

* ``clairvoyant level``: a policy that knows, for every minute, the smoothed demand level (the
  mean of the ``--half`` minutes before and after it, the minute itself excluded: this uses the
  future) and the distribution of the minute's need at that level (fitted in hindsight on the
  whole trace, per 0.1-instance bin). Capacity for a minute is ordered a boot earlier and kept
  until then, as the simulated group requires. Only the per-minute noise is unknown to it.
* ``recent level, hindsight``: a policy that sizes on the mean of the last ``W`` minutes it can
  see when it orders capacity (boot + metric delay + period earlier), with the best capacity per
  level fitted in hindsight and no boot cost or minimum hold (frictionless): an optimistic bound
  for policies whose only signal is the recent level.
* ``policy signal, hindsight``: the same, on the signal ``predictive`` sizes on (the larger of
  the level window's and the short window's mean, plus ``headroom_z`` times the per-minute noise
  from successive differences over the level window, with the Lambda's default settings), with
  the best capacity per 0.1-wide bin of that signal fitted in hindsight, frictionless: what the
  policy's reactive part could reach with a perfect mapping from its signal to capacity and free,
  instant boots (optimistic: ~100 bins fitted on the very minutes they are scored on).

* ``learned quantile model``: a gradient-boosted quantile regression (scikit-learn) of the minute's
  need on twenty causal features (means of the last 1-240 minutes and maxima of the last 15/60
  visible at order time, the same time of day a day and a week earlier, the time of day and the
  weekday), fitted on the part before ``--split``; its shift (a constant added before rounding up)
  is the smallest that keeps the fitted part within the miss budget; scored frictionless on the
  part after. A learned forecaster with far more signals than ``predictive`` reads, and the
  fitted part's figures (in-sample) beside the held-out ones. Only with ``--split``.

For each, the miss budget is spent where it saves most (a Lagrangian sweep over the price of a
missed minute), and the cheapest point within ``--max-miss-pct`` is reported as a ratio to the
oracle's instance-hours.

    python bench/autoscale_bounds.py            # July, whole month -> bench/results/autoscale_bounds.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import autoscale_sim as sim  # noqa: E402


def per_level_capacity(bins: np.ndarray, need: np.ndarray, price: float) -> np.ndarray:
    """Per minute, the capacity that minimises ``capacity + price * P(miss)`` within its bin."""
    cap = np.zeros(len(need))
    for b in np.unique(bins):
        m = bins == b
        nb = need[m]
        cand = np.arange(1, int(nb.max()) + 2)
        misses = (nb[None, :] > cand[:, None]).sum(axis=1)
        cap[m] = cand[np.argmin(cand * m.sum() + price * misses)]
    return cap


def cheapest_within(
    bins: np.ndarray, need: np.ndarray, o_cost: float, max_miss_pct: float, billed_ready
) -> dict | None:
    """Sweep the price of a missed minute; the cheapest (ratio, miss %) within the budget."""
    best = None
    for price in np.geomspace(5, 5000, 120):
        billed, ready = billed_ready(per_level_capacity(bins, need, price))
        miss = 100.0 * float(np.mean(need > ready))
        ratio = float(billed.sum()) / o_cost
        if miss <= max_miss_pct and (best is None or ratio < best["vs_oracle"]):
            best = {"vs_oracle": round(ratio, 3), "under_provisioned_pct": round(miss, 3)}
    return best


def bounds(need: np.ndarray, load: np.ndarray, boot_min: int, lag_min: int, half: int, windows, max_miss):
    """The reference points for one trace (``load``: demand in instances, unrounded)."""
    n = len(need)
    _, o_cost = sim.oracle(need, boot_min)
    cs = np.concatenate([[0.0], np.cumsum(load)])
    i = np.arange(n)
    lo, hi = np.clip(i - half, 0, n), np.clip(i + half + 1, 0, n)
    centred = (cs[hi] - cs[lo] - load) / np.maximum(hi - lo - 1, 1)

    def held(cap):
        """Capacity for minute j is ordered at j - boot_min and kept: billed(k) = max(cap[k..k+boot]);
        ready(j) = min(billed[j-boot..j]), as in the simulated group (boots cancelled first)."""
        ahead = np.concatenate([cap, np.full(boot_min, cap[-1])])
        billed = sliding_window_view(ahead, boot_min + 1).max(axis=1)
        behind = np.concatenate([np.full(boot_min, billed[0]), billed])
        return billed, sliding_window_view(behind, boot_min + 1).min(axis=1)

    out = {"clairvoyant level": cheapest_within(np.floor(centred / 0.1), need, o_cost, max_miss, held)}
    for w in windows:
        end = np.clip(i - lag_min + 1, 0, n)
        start = np.clip(end - w, 0, n)
        recent = (cs[end] - cs[start]) / np.maximum(end - start, 1)
        out[f"recent level ({w} min), hindsight, frictionless"] = cheapest_within(
            np.floor(recent / 0.1), need, o_cost, max_miss, lambda cap: (cap, cap)
        )
    out["policy signal, hindsight, frictionless"] = cheapest_within(
        np.floor(policy_signal(load, lag_min) / 0.1), need, o_cost, max_miss, lambda cap: (cap, cap)
    )
    return out


def policy_signal(load: np.ndarray, lag_min: int) -> np.ndarray:
    """Per minute, ``max(mean(level window), mean(short window)) + headroom_z * noise`` of the
    minutes visible ``lag_min`` earlier (``chalicelib.scaling.level_and_noise``'s estimator, in
    units of full instances: a per-bin fit does not care about the target's scale)."""
    from chalicelib.scaling_settings import ScalingSettings

    s = ScalingSettings(stage="bounds", asg_name="bounds")
    n = len(load)
    i = np.arange(n)
    end = np.clip(i - lag_min + 1, 0, n)
    cs = np.concatenate([[0.0], np.cumsum(load)])

    def mean(w: int) -> np.ndarray:
        start = np.clip(end - w, 0, n)
        return (cs[end] - cs[start]) / np.maximum(end - start, 1)

    level = mean(s.level_window_s // 60)
    if s.level_short_window_s:
        level = np.maximum(level, mean(s.level_short_window_s // 60))
    d2 = np.concatenate([[0.0], np.diff(load) ** 2])  # d2[k] = (load[k] - load[k-1])^2
    c2 = np.concatenate([[0.0], np.cumsum(d2)])
    start = np.clip(end - s.level_window_s // 60 + 1, 0, n)  # the differences inside the window
    noise = np.sqrt((c2[end] - c2[start]) / np.maximum(end - start, 1) / 2.0)
    return level + s.headroom_z * noise


def fitted_then_held_out(
    need: np.ndarray, load: np.ndarray, lag_min: int, cut: int, max_miss: float, boot_min: int = 4
):
    """The policy-signal mapping fitted per bin on minutes ``[0, cut)`` and scored, frictionless,
    on ``[cut, end)`` (bins not seen while fitting: the nearest lower bin's capacity plus the
    distance): the cheapest held-out point within the budget, with the fitting part's figures."""
    _, o_fit = sim.oracle(need[:cut], boot_min)
    _, o_out = sim.oracle(need[cut:], boot_min)
    bins = np.floor(policy_signal(load, lag_min) / 0.1).astype(int)
    fit_b, fit_n, out_b, out_n = bins[:cut], need[:cut], bins[cut:], need[cut:]
    best = None
    for price in np.geomspace(5, 5000, 120):
        cap_fit = per_level_capacity(fit_b, fit_n, price)
        keys, first = np.unique(fit_b, return_index=True)
        vals = cap_fit[first]
        pos = np.clip(np.searchsorted(keys, out_b, side="right") - 1, 0, len(keys) - 1)
        seen = keys[pos] == out_b
        cap = np.where(seen, vals[pos], vals[pos] + np.ceil(np.maximum(out_b - keys[pos], 0) * 0.1))
        miss = 100.0 * float(np.mean(out_n > cap))
        ratio = float(cap.sum()) / o_out
        if miss <= max_miss and (best is None or ratio < best["vs_oracle"]):
            best = {
                "vs_oracle": round(ratio, 3),
                "under_provisioned_pct": round(miss, 3),
                "fitted_part_vs_oracle": round(float(cap_fit.sum()) / o_fit, 3),
                "fitted_part_under_provisioned_pct": round(100.0 * float(np.mean(fit_n > cap_fit)), 3),
            }
    return best


def causal_features(t: np.ndarray, load: np.ndarray, lag_min: int) -> np.ndarray:
    """Per minute, what a policy could know when it orders that minute's capacity (``lag_min``
    earlier): recent means and maxima, the same time a day and a week before (NaN until there
    is one), the time of day and the weekday."""
    n = len(load)
    i = np.arange(n)
    cs = np.concatenate([[0.0], np.cumsum(load)])
    end = np.clip(i - lag_min + 1, 0, n)

    def mean(w: int, e: np.ndarray = end) -> np.ndarray:
        s = np.clip(e - w, 0, n)
        return (cs[e] - cs[s]) / np.maximum(e - s, 1)

    cols = [mean(w) for w in (1, 3, 5, 10, 15, 30, 60, 120, 240)]
    for w in (15, 60):
        m = sliding_window_view(np.concatenate([np.zeros(w - 1), load]), w).max(axis=1)
        cols.append(m[np.clip(end - 1, 0, n - 1)])
    for back in (1440, 10080):
        ok = i - back - 15 >= 0
        cols.append(np.where(ok, mean(30, np.clip(i - back + 16, 0, n)), np.nan))  # centred then
        then_ahead = mean(15, np.clip(i - back + 16, 0, n)) - mean(15, np.clip(i - back - lag_min + 1, 0, n))
        cols.append(np.where(ok, then_ahead, np.nan))  # how the level moved over the lead time then
    day = (t % 86400) / 86400.0
    cols += [np.sin(2 * np.pi * day), np.cos(2 * np.pi * day), ((t // 86400) + 4) % 7]
    return np.column_stack(cols)


def learned_quantile(
    t,
    need,
    load,
    lag_min: int,
    cut: int,
    max_miss: float,
    quantiles=(0.9, 0.97, 0.99, 0.995),
    boot_min: int = 4,
):
    """Per quantile: the held-out (ratio, miss %) of a gradient-boosted quantile model fitted
    before ``cut`` (shift chosen on the fitted part), with the fitted part's own figures."""
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        return {"skipped": "scikit-learn is not installed"}
    x = causal_features(np.asarray(t), load, lag_min)
    x = x[:, ~np.isnan(x[:cut]).all(axis=0)]  # a trace shorter than a week has no week-ago column
    y = need.astype(float)
    _, o_fit = sim.oracle(need[:cut], boot_min)
    _, o_out = sim.oracle(need[cut:], boot_min)
    out = {}
    for q in quantiles:
        model = HistGradientBoostingRegressor(
            loss="quantile",
            quantile=q,
            max_iter=300,
            learning_rate=0.05,
            min_samples_leaf=100,
            random_state=0,
        )
        model.fit(x[:cut], y[:cut])
        fit_pred, out_pred = model.predict(x[:cut]), model.predict(x[cut:])
        for shift in np.linspace(-3, 6, 361):  # the smallest shift within the budget, fitted part
            cap_fit = np.maximum(1, np.ceil(fit_pred + shift))
            if 100.0 * np.mean(y[:cut] > cap_fit) <= max_miss:
                break
        cap = np.maximum(1, np.ceil(out_pred + shift))
        out[f"q={q}"] = {
            "vs_oracle": round(float(cap.sum()) / o_out, 3),
            "under_provisioned_pct": round(100.0 * float(np.mean(y[cut:] > cap)), 3),
            "fitted_part_vs_oracle": round(float(cap_fit.sum()) / o_fit, 3),
            "fitted_part_under_provisioned_pct": round(100.0 * float(np.mean(y[:cut] > cap_fit)), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=sim.DEFAULT_TRACE)
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--capacity-rps", type=float, default=50.0)
    p.add_argument("--peak-instances", type=int, default=20)
    p.add_argument("--boot-min", type=int, default=4)
    p.add_argument("--metric-delay-min", type=int, default=1)
    p.add_argument("--half", type=int, default=15, help="half-width of the clairvoyant smoothing (minutes)")
    p.add_argument("--windows", default="15,30", help="recent-level windows (minutes)")
    p.add_argument("--max-miss-pct", type=float, default=0.5)
    p.add_argument(
        "--split",
        help="also fit the policy-signal mapping on [start, SPLIT) and score it on [SPLIT, end) (UTC date)",
    )
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "autoscale_bounds.json")
    args = p.parse_args(argv)
    cfg = sim.SimConfig(capacity_rps=args.capacity_rps, peak_instances=args.peak_instances)
    t, req = sim.load_trace(args.trace, args.since, args.until)
    demand = req * sim.scale_factor(req, cfg)
    need = sim.needed_instances(demand, cfg)
    load = demand / (cfg.capacity_rps * 60.0)
    lag = args.boot_min + args.metric_delay_min + 1  # boot + metric delay + one period
    windows = [int(w) for w in args.windows.split(",") if w]
    result = bounds(need, load, args.boot_min, lag, args.half, windows, args.max_miss_pct)
    if args.split:
        (_, fit), (label, _) = sim.segment_slices(t, args.split)
        result[f"policy signal, fitted on the part before {args.split}, scored on {label}, frictionless"] = (
            fitted_then_held_out(need, load, lag, fit.stop, args.max_miss_pct, args.boot_min)
        )
        learned = learned_quantile(t, need, load, lag, fit.stop, args.max_miss_pct, boot_min=args.boot_min)
        if "skipped" in learned:
            print(f"learned quantile model skipped: {learned['skipped']}")
        else:
            for q, row in learned.items():
                result[f"learned quantile model ({q}), fitted before {args.split}, scored on {label}"] = row
    print(f"{args.trace.name} {args.since or ''}..{args.until or ''}: {len(t)} minutes, "
          f"cheapest within {args.max_miss_pct} % of minutes under-provisioned")  # fmt: skip
    for name, row in result.items():
        print(
            f"  {name:<48}"
            + (f"{row['vs_oracle']:>7}x {row['under_provisioned_pct']:>7} %" if row else "  none")
        )
    doc = {"trace": args.trace.name, "since": args.since, "until": args.until, "minutes": len(t),
           "split": args.split, "boot_min": args.boot_min, "lag_min": lag, "half": args.half,
           "bounds": result}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
