"""Measure an exported artifact against its PyTorch model: accuracy, macro-F1, size, latency and
throughput per variant, on real texts. Used by ``make demo`` (``nlpfleet/demo.py``) and the
pipeline benchmark (``bench/bench_pipeline.py``); not by serving.

Timing method: texts are tokenized once into fixed batches (padded to the longest in each batch,
truncated to ``max_seq_len``), so every backend runs exactly the same tensors and only model
compute is timed. Each measurement is repeated and the median kept (shared CPUs are noisy);
PyTorch and ONNX Runtime get the same number of intra-op threads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backend:
    name: str  # "pytorch-fp32", "onnx-fp32", "onnx-int8", "onnx-fp16"
    run: object  # callable(batch: dict[str, np.ndarray]) -> np.ndarray logits
    size_bytes: int


def _tokenize_batches(model_dir: Path, texts: list[str], max_seq_len: int, batch_size: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [
        dict(
            tok(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_seq_len,
                return_tensors="np",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def load_backends(
    model_dir: Path, artifact_dir: Path, manifest: dict, threads: int, include_unpublished=True
):
    """PyTorch eager (the fine-tuned checkpoint) and one ONNX Runtime CPU session per variant."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def run_torch(batch):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    backends = [Backend("pytorch-fp32", run_torch, size)]
    for vname, v in manifest["variants"].items():
        if not (v["published"] or include_unpublished):
            continue
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(artifact_dir / v["file"]), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_onnx(batch, sess=sess, names=names):
            return sess.run(None, {n: batch[n].astype(np.int64) for n in names})[0]

        backends.append(Backend(f"onnx-{vname}", run_onnx, v["size"]))
    return backends


def accuracy_table(backends, batches, gold: list[int]) -> dict[str, dict]:
    """Accuracy and macro-F1 of each backend on the batches (in order) against ``gold``."""
    import numpy as np

    from training.worker import macro_f1

    out = {}
    for b in backends:
        pred = np.concatenate([b.run(x).argmax(-1) for x in batches]).tolist()
        acc = sum(int(p == g) for p, g in zip(pred, gold, strict=True)) / len(gold)
        out[b.name] = {"accuracy": acc, "macro_f1": macro_f1(gold, pred), "pred": pred}
    return out


def throughput(backend: Backend, batches, repeats: int = 3) -> dict:
    """Sequences per second over all batches (after one warm-up pass); median of ``repeats``."""
    n = sum(len(next(iter(b.values()))) for b in batches)
    for x in batches[:2]:
        backend.run(x)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for x in batches:
            backend.run(x)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    # With one intra-op thread, CPU time is the compute a pass needs, whatever else the shared
    # machine runs meanwhile: the steadier of the two numbers when other work competes.
    return {
        "seq_per_s": n / med,
        "seq_per_cpu_s": n / statistics.median(cpu),
        "pass_s_median": med,
        "pass_s_all": times,
        "pass_cpu_s_all": cpu,
        "sequences": n,
    }


def latency_ms(backend: Backend, singles, repeats: int = 1) -> dict:
    """Batch-1 latency over ``singles`` (one text per batch): median and p95, milliseconds."""
    for x in singles[:3]:
        backend.run(x)
    ts = []
    for _ in range(repeats):
        for x in singles:
            t0 = time.perf_counter()
            backend.run(x)
            ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return {"p50_ms": statistics.median(ts), "p95_ms": ts[int(0.95 * (len(ts) - 1))], "n": len(ts)}


def tokenized(model_dir: Path, texts: list[str], max_seq_len: int, batch_size: int):
    return _tokenize_batches(model_dir, texts, max_seq_len, batch_size)
