"""Export a fine-tuned classifier to an ONNX model artifact (fp32, int8, fp16) behind a parity gate.

Steps, each a thin adapter over a library that does the real work:

1. ``optimum.exporters.onnx.main_export`` writes ``model.onnx`` (fp32) plus the tokenizer files
   and ``config.json`` from a local Hugging Face checkpoint directory (nothing from a hub).
2. int8: ``onnxruntime.quantization.quantize_dynamic`` on the *raw* export, with two changes
   that keep ONNX Runtime's CPU kernels off slow paths (``_quantize_int8`` says why and what
   was measured): a finite padding-mask constant and no stored intermediate shapes. (ORT 1.31
   fails to quantize the fused transformer graph unless ``DefaultTensorType`` is given, and the
   fused graph measured slower on CPU.)
3. fp16 (for GPUs): ONNX Runtime's transformer optimizer fuses attention/LayerNorm/GELU, then
   converts weights to float16, keeping int64 inputs and float32 logits at the boundary.
4. The parity gate (``inference/parity.py``) runs every variant on held-out texts with
   ONNX Runtime's CPU execution provider and compares with PyTorch. A variant that fails is
   kept on disk with ``published: false`` and its reasons in ``parity``; it is never uploaded.
   fp16 is checked on CPU too: ORT 1.31 has float16 CPU kernels for every op this graph uses,
   so the check is real, though a GPU's fp16 numerics can differ slightly from the CPU's.
5. ``labels.json`` and finally ``manifest.json`` (atomically, last): an artifact directory with
   a manifest is complete by construction.

Example::

    manifest = export_model("ckpt/final", "out/banking77", name="banking77", version="v1",
                            labels=labels, heldout_texts=texts, heldout_labels=ids,
                            dataset_sha256=sha, metrics={"accuracy": 0.92})
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from chalicelib.manifest import VARIANT_NAMES, ManifestError, validate_manifest
from inference.artifact import MANIFEST, sha256_file
from inference.parity import ParityThresholds, judge, measure

log = logging.getLogger(__name__)

VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
VARIANT_PROVIDERS = {
    "fp32": "CPUExecutionProvider",
    "int8": "CPUExecutionProvider",
    "fp16": "CUDAExecutionProvider",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_REPO = Path(__file__).resolve().parents[1]
DEFAULT_THRESHOLDS = ParityThresholds()


class ExportError(Exception):
    """The export cannot produce a publishable artifact (bad inputs, no variant passed the gate)."""


def code_version() -> str:
    """The code that built an artifact: ``NLPFLEET_CODE_VERSION`` if set (AMI builds bake it in),
    else the git commit of this checkout (``-dirty`` when modified), else the package version."""
    env = os.environ.get("NLPFLEET_CODE_VERSION")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "nlpfleet-" + version("nlpfleet")
        except PackageNotFoundError:
            return "unknown"


def _export_fp32(model_dir: Path, out_dir: Path) -> None:
    from optimum.exporters.onnx import main_export

    # Our own parity gate replaces optimum's validation (it would run the model a second time).
    main_export(
        str(model_dir),
        str(out_dir),
        task="text-classification",
        do_validation=False,
        local_files_only=True,
    )


# The additive padding mask of the int8 graph (see ``_soften_padding_mask``).
INT8_PADDING_MASK_VALUE = -50.0


def _soften_padding_mask(model, value: float = INT8_PADDING_MASK_VALUE) -> int:
    """Replace the float32-minimum constant of the attention padding mask with ``value``; return
    how many constants were replaced (0 when the graph builds its mask another way).

    Why: the exported BERT graph adds ``finfo(float32).min`` to the scores of padded positions.
    In ONNX Runtime's CPU Softmax (MLAS) every padded position then goes through exp of a number
    far below -87, whose result is a denormal float32, and denormal arithmetic made Softmax ~8x
    slower on this CPU (4.6 ms vs 0.57 ms for a [32, 12, 41, 41] input; the session
    option ``session.set_denormal_as_zero`` did not help with one intra-op thread): a quarter of
    the int8 model's time. With -50 a padded position weighs e^(s_pad - s_max - 50) of the row's
    largest score: under 1e-6 unless its raw score beats every real token's by more than 36, so
    decisions cannot move; the parity gate checks the result against PyTorch anyway.
    """
    import numpy as np
    from onnx import numpy_helper

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        t = node.attribute[0].t
        if t.data_type != 1:  # FLOAT
            continue
        a = numpy_helper.to_array(t)
        if a.size != 1 or a.ravel()[0] != np.finfo(np.float32).min:
            continue
        if not all(c.op_type in ("Where", "Add", "Mul") for c in consumers.get(node.output[0], [])):
            continue
        t.CopyFrom(numpy_helper.from_array(np.full(a.shape, value, dtype=np.float32), t.name))
        replaced += 1
    return replaced


def _quantize_int8(fp32_path: Path, out_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    if not _soften_padding_mask(model):
        log.info("int8: no float32-minimum padding mask found in %s; left as exported", fp32_path)
    # Signed 8-bit per-channel weights for the MatMuls (where the time goes), dynamic activations,
    # 7-bit weight range. Measured top-1 agreement with fp32 on the 965 banking77 dev texts
    # (bench model, 92.1 % accurate): per-channel 98.96 % (fails the 99 % gate), + reduce_range
    # 99.27 % at the same speed (this CPU has VNNI, but the 7-bit range is what keeps the
    # agreement); per-tensor 97.31 %. Gather (the embedding table) stays fp32: a lookup is not
    # compute, and quantizing it cost a further ~2 % of agreement. Quantizing the transformer
    # optimizer's fused graph (QAttention, SkipLayerNormalization) measured slower here.
    quantize_dynamic(
        model,
        str(out_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        op_types_to_quantize=["MatMul"],
    )
    # The quantizer stores inferred intermediate shapes (value_info). With them, ORT's
    # SkipLayerNormFusion turns 6 of the 13 Add+LayerNormalization pairs into
    # SkipLayerNormalization, whose CPU kernel took ~3.9 ms per call here against ~0.5 ms for the
    # unfused pair: ~14 % of the int8 model's time. Without them ORT infers shapes itself at load
    # and, as for the fp32 export, keeps the pairs unfused. Same weights, same outputs.
    quantized = onnx.load(str(out_path))
    del quantized.graph.value_info[:]
    onnx.save(quantized, str(out_path))


def _convert_fp16(fp32_path: Path, out_path: Path, config: dict) -> None:
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(
        str(fp32_path),
        model_type="bert",
        num_heads=int(config.get("num_attention_heads", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
        # Python fusions only: ORT's own graph pass would need a GPU session here, and the
        # serving instance's session applies the provider-specific rest at load time.
        opt_level=0,
    )
    # int64 ids in, float32 logits out: the same I/O signature as the other variants.
    opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(out_path))


def _tokenize(model_dir: Path, texts: list[str], max_seq_len: int, batch_size: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for i in range(0, len(texts), batch_size):
        yield tok(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_seq_len,
            return_tensors="np",
        )


def torch_logits(
    model_dir: Path, texts: list[str], max_seq_len: int, batch_size: int = 32, num_threads: int | None = None
):
    """The reference: the fine-tuned PyTorch model's logits, fp32, eval mode."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    out = []
    try:
        with torch.inference_mode():
            for enc in _tokenize(model_dir, texts, max_seq_len, batch_size):
                batch = {k: torch.from_numpy(v) for k, v in enc.items()}
                out.append(model(**batch).logits.float().numpy())
    finally:
        torch.set_num_threads(previous_threads)
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)


def onnx_logits(
    onnx_path: Path,
    model_dir: Path,
    texts: list[str],
    max_seq_len: int,
    batch_size: int = 32,
    num_threads: int | None = None,
):
    """A variant's logits under ONNX Runtime's CPU execution provider."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = num_threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = []
    for enc in _tokenize(model_dir, texts, max_seq_len, batch_size):
        feed = {n: enc[n].astype(np.int64) for n in names}
        out.append(sess.run(None, feed)[0].astype(np.float32))
    return np.concatenate(out)


def _check_inputs(model_dir: Path, labels, heldout_texts, heldout_labels, config: dict) -> None:
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ExportError(f"labels must be at least 2 distinct names, got {len(labels)}")
    n_cfg = len(config.get("id2label") or {}) or config.get("num_labels")
    if n_cfg and n_cfg != len(labels):
        raise ExportError(
            f"{model_dir}/config.json has {n_cfg} labels but {len(labels)} label names were given"
        )
    if len(heldout_texts) != len(heldout_labels):
        raise ExportError(f"{len(heldout_texts)} held-out texts but {len(heldout_labels)} held-out labels")
    bad = [y for y in heldout_labels if not (isinstance(y, int) and 0 <= y < len(labels))]
    if bad:
        raise ExportError(f"held-out labels must be class ids in [0, {len(labels)}), got e.g. {bad[0]!r}")


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    version: str,
    labels: list[str],
    heldout_texts: list[str],
    heldout_labels: list[int],
    dataset_sha256: str,
    metrics: dict,
    max_seq_len: int = 128,
    base_model: str | None = None,
    variants: tuple[str, ...] = VARIANT_NAMES,
    thresholds: ParityThresholds = DEFAULT_THRESHOLDS,
    batch_size: int = 32,
    num_threads: int | None = None,
) -> dict:
    """Export ``model_dir`` to an artifact directory ``out_dir``; return the manifest.

    Raises ``ExportError`` when no variant passes the parity gate (no manifest is written)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = (
        json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    )
    _check_inputs(model_dir, list(labels), heldout_texts, heldout_labels, config)
    unknown = set(variants) - set(VARIANT_NAMES)
    if unknown or "fp32" not in variants:
        raise ExportError(f"variants must include fp32 and be among {VARIANT_NAMES}, got {variants}")

    out_dir.mkdir(parents=True, exist_ok=True)
    # A stale manifest would make a half-rewritten directory look complete.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        _export_fp32(model_dir, Path(tmp))
        for f in Path(tmp).iterdir():
            shutil.move(str(f), out_dir / f.name)
    timings["export_fp32_s"] = time.perf_counter() - t0

    built: dict[str, Path] = {"fp32": out_dir / VARIANT_FILES["fp32"]}
    build_errors: dict[str, str] = {}
    builders = {
        "int8": lambda p: _quantize_int8(built["fp32"], p),
        "fp16": lambda p: _convert_fp16(built["fp32"], p, config),
    }
    for v in variants:
        if v == "fp32":
            continue
        path = out_dir / VARIANT_FILES[v]
        t0 = time.perf_counter()
        try:
            builders[v](path)
            built[v] = path
        except Exception as e:  # a failed optional variant is reported, not fatal
            log.warning("building the %s variant failed: %s", v, e)
            build_errors[v] = f"build failed: {type(e).__name__}: {e}"
        timings[f"build_{v}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = torch_logits(model_dir, heldout_texts, max_seq_len, batch_size, num_threads)
    parity: dict[str, dict] = {}
    for v, path in built.items():
        try:
            m = measure(
                ref,
                onnx_logits(path, model_dir, heldout_texts, max_seq_len, batch_size, num_threads),
                heldout_labels,
            )
            passed, reasons = judge(v, m, thresholds)
        except Exception as e:  # e.g. a provider without kernels for this precision
            m, passed, reasons = {"n": len(heldout_texts)}, False, [f"could not run: {type(e).__name__}: {e}"]
        parity[v] = {**m, "passed": passed, "reasons": reasons, "checked_on": "CPUExecutionProvider"}
    for v, why in build_errors.items():
        parity[v] = {"n": len(heldout_texts), "passed": False, "reasons": [why], "checked_on": None}
    timings["parity_s"] = time.perf_counter() - t0

    (out_dir / "labels.json").write_text(json.dumps(list(labels), indent=1) + "\n", encoding="utf-8")
    tokenizer_files = [f for f in TOKENIZER_FILES if (out_dir / f).is_file()]
    files = {f: sha256_file(out_dir / f) for f in [*tokenizer_files, "config.json", "labels.json"]}
    variant_docs = {
        v: {
            "file": path.name,
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
            "precision": v,
            "provider": VARIANT_PROVIDERS[v],
            "published": parity[v]["passed"],
        }
        for v, path in built.items()
    }
    manifest = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "base_model": base_model or config.get("nlpfleet_base_model") or model_dir.name,
        "task": "text-classification",
        "labels": list(labels),
        "max_seq_len": int(max_seq_len),
        "dataset_sha256": dataset_sha256,
        "metrics": dict(metrics),
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "code_version": code_version(),
        "tokenizer_files": tokenizer_files,
        "files": files,
        "variants": variant_docs,
        "parity": {"thresholds": thresholds.to_dict(), **parity},
        "export_timings_s": {k: round(x, 3) for k, x in timings.items()},
    }
    try:
        validate_manifest(manifest)
    except ManifestError as e:
        why = {v: p["reasons"] for v, p in parity.items() if not p["passed"]}
        raise ExportError(f"no publishable artifact from {model_dir}: {e}; parity: {why}") from e
    tmp_manifest = out_dir / (MANIFEST + ".part")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, out_dir / MANIFEST)
    return manifest
