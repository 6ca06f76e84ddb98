"""The model pipeline, end to end, in a few minutes on a laptop CPU (``make demo`` until the local
stack's demo takes over; ``python -m nlpfleet.demo``).

Fine-tunes the packaged MiniLM on a per-intent slice of banking77 (``../shared/data`` beside the
repository, or ``$NLPFLEET_SHARED/data``), exports it to ONNX (fp32, int8, fp16) behind the parity
gate, and prints one table: dev accuracy, size and latency of each variant next to PyTorch.
The quick configuration trades accuracy for time (a full run: ``bench/bench_pipeline.py``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 48  # banking77 queries are short: median 13 tokens, 98.5 % fit in 48


class DemoError(Exception):
    """Something the user must fix before the demo can run (the message says what)."""


def shared_data_dir(environ=os.environ) -> Path:
    root = Path(environ["NLPFLEET_SHARED"]) if environ.get("NLPFLEET_SHARED") else REPO.parent / "shared"
    d = root / "data" / "banking77"
    if not (d / "train.csv").is_file() or not (d / "dev.csv").is_file():
        raise DemoError(
            f"banking77 not found at {d} (expected train.csv and dev.csv): put the shared data folder "
            f"beside the repository as ../shared/data, or set NLPFLEET_SHARED to the folder holding data/"
        )
    return d


def per_label_slice(src: Path, dest: Path, per_label: int) -> int:
    seen: dict[str, int] = {}
    rows = []
    with open(src, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if seen.get(r["category"], 0) < per_label:
                seen[r["category"]] = seen.get(r["category"], 0) + 1
                rows.append(r)
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def table_rows(manifest: dict, latency_p50_ms: dict[str, float], size_bytes: dict[str, int]) -> list[dict]:
    """One row per backend. Accuracies come from the parity gate, which already ran PyTorch (the
    reference) and every variant over the whole held-out (dev) split: no second pass needed.

    >>> m = {"parity": {"thresholds": {}, "fp32": {"accuracy": 0.9, "macro_f1": 0.8,
    ...      "reference_accuracy": 0.9, "reference_macro_f1": 0.8, "passed": True, "reasons": []}}}
    >>> [r["gate"] for r in table_rows(m, {"pytorch-fp32": 9.0, "onnx-fp32": 4.0}, {})]
    ['reference', 'published']
    """
    par = manifest["parity"]
    rows = []
    ref = next(p for v, p in par.items() if v != "thresholds" and "reference_accuracy" in p)
    rows.append({"name": "pytorch-fp32", "accuracy": ref["reference_accuracy"], "macro_f1": ref["reference_macro_f1"],
                 "gate": "reference"})  # fmt: skip
    for v, p in par.items():
        if v == "thresholds":
            continue
        gate = "published" if p["passed"] else "held back: " + "; ".join(p["reasons"])
        rows.append(
            {"name": f"onnx-{v}", "accuracy": p.get("accuracy"), "macro_f1": p.get("macro_f1"), "gate": gate}
        )
    for r in rows:
        r["p50_ms"] = latency_p50_ms.get(r["name"])
        r["size_mb"] = size_bytes[r["name"]] / 1e6 if r["name"] in size_bytes else None
    return rows


def format_table(rows: list[dict]) -> str:
    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    lines = [
        f"{'variant':14} {'accuracy %':>10} {'macro-F1':>9} {'size MB':>8} {'p50 ms (1 text)':>16}  gate"
    ]
    for r in rows:
        acc = num(None if r["accuracy"] is None else 100 * r["accuracy"], ".2f")
        lines.append(f"{r['name']:14} {acc:>10} {num(r['macro_f1'], '.4f'):>9} {num(r['size_mb'], '.1f'):>8} "
                     f"{num(r['p50_ms'], '.2f'):>16}  {r['gate']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nlpfleet.demo", description=__doc__)
    p.add_argument("--per-label", type=int, default=30, help="training rows per intent (77 intents)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / "out" / "demo")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        data = shared_data_dir()
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2

    from inference.export import export_model
    from inference.export_eval import latency_ms, load_backends, tokenized
    from training.config import TrainConfig
    from training.worker import train

    args.work.mkdir(parents=True, exist_ok=True)
    train_csv = args.work / "train.csv"
    n = per_label_slice(data / "train.csv", train_csv, args.per_label)
    print(f"[1/3] fine-tuning all-MiniLM-L6-v2 on {n} banking77 rows ({args.per_label} per intent), "
          f"{args.epochs} epochs, evaluating on the 965 dev rows", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    result = train(
        TrainConfig(
            train=str(train_csv),
            dev=str(data / "dev.csv"),
            label_column="category",
            output_dir=str(args.work / "run"),
            max_seq_len=MAX_SEQ_LEN,
            batch_size=32,
            epochs=args.epochs,
            lr=2e-4,
            warmup_ratio=0.1,
            num_threads=args.threads,
            freeze_embeddings=True,
            resume=False,
        )
    )
    train_s = time.perf_counter() - t0
    print("[2/3] exporting to ONNX (fp32, int8, fp16) behind the parity gate", flush=True)
    t0 = time.perf_counter()
    artifact = args.work / "artifact"
    manifest = export_model(
        result.model_dir,
        artifact,
        name="banking77-demo",
        version="demo",
        labels=result.labels,
        heldout_texts=result.heldout_texts,
        heldout_labels=result.heldout_labels,
        dataset_sha256=result.dataset_sha256,
        metrics=result.metrics,
        max_seq_len=MAX_SEQ_LEN,
        base_model=result.base_model,
        num_threads=args.threads,
    )
    export_s = time.perf_counter() - t0
    print("[3/3] measuring latency of each variant", flush=True)
    model_dir = Path(result.model_dir)
    backends = load_backends(model_dir, artifact, manifest, args.threads)
    singles = tokenized(model_dir, result.heldout_texts[:100], MAX_SEQ_LEN, 1)
    latencies = {b.name: latency_ms(b, singles)["p50_ms"] for b in backends}
    sizes = {b.name: b.size_bytes for b in backends}
    print(f"\nbanking77 dev, {len(result.heldout_texts)} texts; training {train_s:.0f} s, export {export_s:.0f} s; "
          f"artifact: {artifact}")  # fmt: skip
    print(format_table(table_rows(manifest, latencies, sizes)))
    print(
        "\nfp16 is meant for GPUs (CUDAExecutionProvider); here ONNX Runtime's CPU kernels run it for the gate."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
