"""Benchmark the model pipeline on banking77: full fine-tune → ONNX export → int8/fp16 → parity gate,
then, side by side from one run, dev accuracy / macro-F1 of PyTorch fp32, ONNX fp32, ONNX int8
(and fp16 as run by ONNX Runtime's CPU kernels), training time, and inference throughput
(sequences/s on the 965 real dev texts, batch 32) of PyTorch eager vs ONNX Runtime fp32 vs int8.

Goals (issue 2): dev accuracy >= 91 %, int8 within 1 point of fp32, int8 >= 2.5x PyTorch eager.

    .venv/bin/python bench/bench_pipeline.py                 # full run (tens of minutes on 2 cores)
    .venv/bin/python bench/bench_pipeline.py --quick         # smoke run (a slice, one epoch)

Writes ``bench/results/pipeline-<UTC time>.json`` (or ``--out``) and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("NLPFLEET_SHARED", REPO.parent / "shared"))
    p.add_argument("--data", type=Path, default=shared / "data" / "banking77")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench-pipeline")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    # One thread each by default: on 2 cores shared with other work, a second OpenMP thread
    # spins against other processes and made training steps 4-8x slower (measured).
    p.add_argument("--train-threads", type=int, default=1, help="torch intra-op threads while training")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every inference backend")
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a 20-per-label slice, 1 epoch: checks the script")
    p.add_argument(
        "--reuse-training",
        action="store_true",
        help="skip training: export and measure the model a previous run left in --work (its recorded "
        "training time is reported)",
    )
    return p.parse_args(argv)


def _previous_result(config):
    """The TrainResult of an earlier run in the same --work (model + train_result.json)."""
    import csv

    from training.worker import TrainResult

    saved = json.loads((Path(config.output_dir) / "train_result.json").read_text())
    saved.pop("heldout_texts", None)
    labels = saved["labels"]
    with open(config.dev, newline="", encoding="utf-8") as f:
        dev = list(csv.DictReader(f))
    return TrainResult(
        **saved,
        heldout_texts=[r["text"] for r in dev],
        heldout_labels=[labels.index(r[config.label_column]) for r in dev],
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from inference.export import export_model
    from inference.export_eval import accuracy_table, latency_ms, load_backends, throughput, tokenized
    from training.config import TrainConfig
    from training.data import DataError
    from training.worker import train

    if not (args.data / "train.csv").is_file():
        print(f"bench_pipeline: banking77 not found at {args.data} (set NLPFLEET_SHARED)", file=sys.stderr)
        return 2
    train_csv, dev_csv = args.data / "train.csv", args.data / "dev.csv"
    if args.quick:
        import csv

        args.work.mkdir(parents=True, exist_ok=True)
        seen, rows = {}, []
        with open(train_csv, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if seen.get(r["category"], 0) < 20:
                    seen[r["category"]] = seen.get(r["category"], 0) + 1
                    rows.append(r)
        train_csv = args.work / "train-quick.csv"
        with open(train_csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows(rows)
        args.epochs = 1
        args.repeats = 1
    run_dir = args.work / "run"
    config = TrainConfig(
        train=str(train_csv),
        dev=str(dev_csv),
        label_column="category",
        output_dir=str(run_dir),
        max_seq_len=args.max_seq_len,
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        num_threads=args.train_threads,
        freeze_embeddings=args.freeze_embeddings,
        checkpoint_every_steps=200,
        resume=False,
    )
    try:
        if args.reuse_training:
            result = _previous_result(config)
            train_s = result.train_time_s
        else:
            t0 = time.perf_counter()
            result = train(config)
            train_s = time.perf_counter() - t0
    except DataError as e:
        print(f"bench_pipeline: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    artifact = args.work / "artifact"
    manifest = export_model(
        result.model_dir,
        artifact,
        name="banking77",
        version="bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
        labels=result.labels,
        heldout_texts=result.heldout_texts,
        heldout_labels=result.heldout_labels,
        dataset_sha256=result.dataset_sha256,
        metrics=result.metrics,
        max_seq_len=args.max_seq_len,
        base_model=result.base_model,
        num_threads=args.threads,
    )
    export_s = time.perf_counter() - t0

    model_dir = Path(result.model_dir)
    texts, gold = result.heldout_texts, result.heldout_labels
    batches = tokenized(model_dir, texts, args.max_seq_len, 32)
    timed = batches[:8] if args.quick else batches
    singles = tokenized(model_dir, texts[: 50 if args.quick else 200], args.max_seq_len, 1)
    backends = load_backends(model_dir, artifact, manifest, args.threads)
    acc = accuracy_table(backends, batches, gold)
    rows = {}
    for b in backends:
        tp = throughput(b, timed, args.repeats)
        lat = latency_ms(b, singles)
        rows[b.name] = {
            "accuracy": acc[b.name]["accuracy"],
            "macro_f1": acc[b.name]["macro_f1"],
            "size_mb": b.size_bytes / 1e6,
            "seq_per_s": tp["seq_per_s"],
            "seq_per_cpu_s": tp["seq_per_cpu_s"],
            "pass_s_all": tp["pass_s_all"],
            "pass_cpu_s_all": tp["pass_cpu_s_all"],
            "latency_b1_p50_ms": lat["p50_ms"],
            "latency_b1_p95_ms": lat["p95_ms"],
            "published": manifest["variants"].get(b.name.removeprefix("onnx-"), {}).get("published"),
        }
    eager, eager_cpu = rows["pytorch-fp32"]["seq_per_s"], rows["pytorch-fp32"]["seq_per_cpu_s"]
    for r in rows.values():
        r["speedup_vs_eager"] = r["seq_per_s"] / eager
        r["cpu_speedup_vs_eager"] = r["seq_per_cpu_s"] / eager_cpu
    fp32_acc = rows["onnx-fp32"]["accuracy"]
    goals = {
        "dev_accuracy_ge_91": rows["pytorch-fp32"]["accuracy"] >= 0.91,
        "int8_within_1pt_of_fp32": "onnx-int8" in rows and fp32_acc - rows["onnx-int8"]["accuracy"] <= 0.01,
        "int8_ge_2.5x_eager": "onnx-int8" in rows and rows["onnx-int8"]["speedup_vs_eager"] >= 2.5,
        "int8_ge_2.5x_eager_cpu_time": "onnx-int8" in rows
        and rows["onnx-int8"]["cpu_speedup_vs_eager"] >= 2.5,
    }
    report = {
        "benchmark": "pipeline",
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python bench/bench_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "train_threads": args.train_threads,
            "inference_threads": args.threads,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "config": config.to_dict(),
        "train": {
            "train_time_s": train_s,
            "steps": result.steps,
            "history": result.history,
        },
        "export_time_s": export_s,
        "export_timings_s": manifest.get("export_timings_s"),
        "parity": manifest["parity"],
        "published": {k: v["published"] for k, v in manifest["variants"].items()},
        "dev_texts": len(texts),
        "results": rows,
        "goals": goals,
    }
    out = (
        args.out
        or REPO / "bench" / "results" / f"pipeline-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nbanking77 dev ({len(texts)} texts), {args.threads} inference thread(s), training {train_s / 60:.1f} min "
          f"({result.steps} steps, {args.epochs} epochs), export {export_s:.0f} s")  # fmt: skip
    print(f"{'backend':14} {'acc %':>7} {'macroF1':>8} {'size MB':>8} {'seq/s b32':>10} {'x eager':>8} "
          f"{'seq/cpu-s':>9} {'x eager':>7} {'p50 b1 ms':>10} {'published':>9}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:14} {100 * r['accuracy']:7.2f} {r['macro_f1']:8.4f} {r['size_mb']:8.1f} {r['seq_per_s']:10.1f} "
              f"{r['speedup_vs_eager']:8.2f} {r['seq_per_cpu_s']:9.1f} {r['cpu_speedup_vs_eager']:7.2f} "
              f"{r['latency_b1_p50_ms']:10.2f} {str(r['published']):>9}")  # fmt: skip
    print("goals:", json.dumps(goals))
    print("written:", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
