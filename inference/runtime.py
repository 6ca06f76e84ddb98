"""Load a verified model artifact into an ONNX Runtime session and classify texts with it.

``load_classifier(artifact_dir)`` verifies the artifact's sha256 sums (``inference.artifact``),
chooses the variant and execution providers (``inference.providers``), opens the session and
the tokenizer, and returns a ``Classifier``. The server, the batch_infer job and the benchmarks
all go through it, so they run the same bytes the same way.

Example::

    clf = load_classifier("out/banking77")
    clf.classify(["I lost my card"], top_k=3)
    # [{"label": "lost_or_stolen_card", "score": 0.93, "top_k": [{"label": ..., "score": ...}, ...]}]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.batching import DEFAULT_RUN_OVERHEAD_TOKENS
from inference.providers import ExecutionPlan, Hardware, choose_execution, detect_hardware

log = logging.getLogger("nlpfleet.runtime")


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool  # the text had more tokens than the limit and was cut


# On a GPU, every input shape the session has not met yet costs a slow first run (kernel
# selection, memory arena growth): up to ~50-70 ms on an H100 with the CUDA provider, against
# 0.6 ms for a warm one. There, batches are padded to a few shapes (length up to a multiple of
# SHAPE_STEP, rows up to a power of two) and ``warmup`` runs all of them before the server is ready.
# On CPU, shapes are exact: padding costs compute there and new shapes cost nothing.
SHAPE_STEP = 16


class Classifier:
    """A tokenizer and an ONNX Runtime session for one artifact. Thread-safe for ``encode`` and
    ``predict`` (ONNX Runtime sessions may be run from several threads)."""

    def __init__(
        self,
        *,
        artifact_dir: Path,
        manifest: dict,
        plan: ExecutionPlan,
        session,
        tokenizer,
        max_tokens: int,
        max_batch_size: int = 32,
    ):
        self.artifact_dir = artifact_dir
        self.manifest = manifest
        self.plan = plan
        self.session = session
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        # A run's fixed cost in tokens, for the batcher (take_batch); the server measures it at
        # warm-up (run_cost) or takes it from its settings.
        self.run_overhead_tokens = DEFAULT_RUN_OVERHEAD_TOKENS
        self.run_overhead_source = "default"
        self.labels: list[str] = list(manifest["labels"])
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_name = session.get_outputs()[0].name
        # Without character offsets (tokenizers >= 0.21), which nothing here reads: measured
        # 28 vs 39 us per Banking77 question on this CPU, a few percent of a request's cost.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad
        self.providers_in_use: list[str] = list(session.get_providers())
        # I/O binding only where the first provider really is a GPU one: ONNX Runtime may have
        # fallen back to CPU at session creation (a missing CUDA/TensorRT library).
        self.io_binding = plan.io_binding and self.providers_in_use[0] in (
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
        )

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def variant(self) -> str:
        return self.plan.variant

    def describe(self) -> dict:
        """What ``GET /v1/model`` reports: the manifest and what actually executes it."""
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "precision": self.plan.precision,
            "provider": self.providers_in_use[0],
            "providers": self.providers_in_use,
            "providers_requested": list(self.plan.provider_names),
            "io_binding": self.io_binding,
            "choice_reason": self.plan.reason,
            "max_tokens_per_text": self.max_tokens,
            "labels": len(self.labels),
            "manifest": self.manifest,
        }

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Token ids per text, truncated to ``max_tokens`` (special tokens included)."""
        encs = self._encode_batch(list(texts))
        return [Encoded(e.ids, bool(e.overflowing)) for e in encs]

    def padded_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, length) a batch is padded to: exact on CPU, bucketed on a GPU (see SHAPE_STEP).

        Buckets never exceed what the session was built for (TensorRT's shape profile): the
        batch is capped at ``max_batch_size``, the length at ``max_tokens``."""
        if not self.io_binding:
            return rows, longest
        b = min(1 << (rows - 1).bit_length(), max(rows, self.max_batch_size))
        s = min(-(-longest // SHAPE_STEP) * SHAPE_STEP, max(longest, self.max_tokens))
        return b, s

    def pad(self, batch_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The session's inputs for a batch: ids padded to the longest sequence (to the shape
        bucket on a GPU; extra rows attend to one pad token and their outputs are dropped), and
        the mask."""
        rows, longest = self.padded_shape(len(batch_ids), max(len(x) for x in batch_ids))
        ids = np.full((rows, longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, longest), dtype=np.int64)
        for j, x in enumerate(batch_ids):
            ids[j, : len(x)] = x
            mask[j, : len(x)] = 1
        mask[len(batch_ids) :, 0] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {k: v for k, v in feeds.items() if k in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run the session on padded inputs; float32 logits (batch, labels)."""
        if self.io_binding:
            # Inputs copied to the device once, output left there until the single copy back.
            binding = self.session.io_binding()
            for k, v in feeds.items():
                binding.bind_cpu_input(k, v)
            binding.bind_output(self.output_name, "cuda", 0)
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        else:
            out = self.session.run([self.output_name], feeds)[0]
        return np.asarray(out, dtype=np.float32)

    def logits(self, batch_ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self.run(self.pad(batch_ids))[: len(batch_ids)]

    def predict(self, batch_ids: Sequence[Sequence[int]], top_ks: Sequence[int]) -> list[dict]:
        """One result per sequence: the best label and score, and the ``top_k`` best."""
        return self.predict_padded(self.pad(batch_ids), top_ks)

    def predict_padded(self, feeds: dict[str, np.ndarray], top_ks: Sequence[int]) -> list[dict]:
        z = self.run(feeds)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        kmax = min(max(top_ks), p.shape[1])
        top = np.argsort(-p, axis=1)[:, :kmax]
        out = []
        for j, k in enumerate(top_ks):
            best = [{"label": self.labels[c], "score": float(p[j, c])} for c in top[j, : min(k, kmax)]]
            out.append({"label": best[0]["label"], "score": best[0]["score"], "top_k": best})
        return out

    def classify(
        self, texts: Sequence[str], top_k: int = 1, *, max_batch_size: int = 32, max_batch_tokens: int = 8192
    ) -> list[dict]:
        """Classify any number of texts: sorted by length into padded-cost-bounded batches,
        results returned in input order (each with ``truncated``)."""
        if not texts:
            return []
        encs = self.encode(texts)
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        results: list[dict | None] = [None] * len(encs)
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the last text taken is the longest: cost = its length x count.
            while (
                end < len(order)
                and end - start < max_batch_size
                and len(encs[order[end]].ids) * (end - start + 1) <= max_batch_tokens
            ):
                end += 1
            chunk = order[start:end]
            preds = self.predict([encs[i].ids for i in chunk], [top_k] * len(chunk))
            for i, r in zip(chunk, preds, strict=True):
                r["truncated"] = encs[i].truncated
                results[i] = r
            start = end
        return results  # type: ignore[return-value]

    def warmup(self, rounds: int = 3, max_batch_size: int = 32) -> None:
        """Run the shapes serving will meet (one short text, a full batch, one longest text) so
        that lazy initialisation and engine builds happen before the server says it is ready.
        On a GPU, every shape bucket once more (a few dozen runs of a millisecond or so)."""
        unk = self.tokenizer.token_to_id("[UNK]") or 100
        shapes = [(1, 8), (max_batch_size, 32), (1, self.max_tokens)]
        for _ in range(max(1, rounds)):
            for b, s in shapes:
                self.predict([[unk] * s] * b, [1] * b)
        if self.io_binding:
            for b, s in self.shape_buckets(max_batch_size):
                self.predict([[unk] * s] * b, [1] * b)

    def run_cost(self, rounds: int = 9) -> tuple[float, float]:
        """(fixed seconds per run, seconds per padded token) of this session, measured on two
        shapes (one 8-token text; 16 texts of 32 tokens), the fastest of ``rounds`` runs each
        (the least disturbed by other work on the machine). The batcher weighs a run's fixed
        cost against padding with it (``take_batch``)."""
        unk = self.tokenizer.token_to_id("[UNK]") or 100
        small, big = (1, min(8, self.max_tokens)), (16, min(32, self.max_tokens))
        times = {}
        for b, s in (small, big):
            feeds = self.pad([[unk] * s] * b)
            samples = []
            for _ in range(max(1, rounds)):
                t0 = time.perf_counter()
                self.predict_padded(feeds, [1] * b)
                samples.append(time.perf_counter() - t0)
            times[(b, s)] = min(samples)
        tokens = {k: math.prod(self.padded_shape(*k)) for k in times}
        per = max(1e-9, (times[big] - times[small]) / max(1, tokens[big] - tokens[small]))
        fixed = max(0.0, times[small] - per * tokens[small])
        return fixed, per

    def shape_buckets(self, max_batch_size: int) -> list[tuple[int, int]]:
        """Every (rows, length) ``pad`` can produce for batches up to ``max_batch_size``."""
        seen = {
            self.padded_shape(b, s)
            for b in range(1, max_batch_size + 1)
            for s in range(1, self.max_tokens + 1)
        }
        return sorted(seen)


def _tokenizer(artifact_dir: Path, manifest: dict, max_tokens: int):
    from tokenizers import Tokenizer

    path = artifact_dir / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        from tokenizers.implementations import BertWordPieceTokenizer

        cfg_path = artifact_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tok = BertWordPieceTokenizer(
            str(artifact_dir / "vocab.txt"), lowercase=cfg.get("do_lower_case", True)
        )
    # Exported tokenizers often pad to max length: padding is the batcher's job, per batch.
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    return tok


def load_classifier(
    artifact_dir: str | os.PathLike,
    variant: str | None = None,
    providers: Sequence[str] | None = None,
    *,
    max_tokens_per_text: int | None = None,
    intra_op_threads: int = 0,
    max_batch_size: int = 32,
    trt_cache_dir: str = "/var/cache/nlpfleet/trt",
    hardware: Hardware | None = None,
    verify: bool = True,
) -> Classifier:
    """Verify the artifact, choose variant and providers, open session and tokenizer.

    Raises ``inference.artifact.ArtifactError`` for a missing/corrupt artifact and
    ``inference.providers.ProviderError`` for an override that cannot run here.
    """
    import onnxruntime as ort

    from chalicelib.manifest import published_variants
    from inference.artifact import load_manifest, verify_artifact

    root = Path(artifact_dir)
    manifest = verify_artifact(root) if verify else load_manifest(root)
    hw = hardware or detect_hardware()
    max_tokens = min(max_tokens_per_text or manifest["max_seq_len"], manifest["max_seq_len"])
    # Engines are specific to the model bytes: one cache folder per model version and variant.
    cache_key = f"{manifest['name']}-{manifest['version']}"
    plan = choose_execution(
        available=hw.available_providers,
        gpu_count=hw.gpu_count,
        published=published_variants(manifest),
        variant=variant or "",
        providers=tuple(providers or ()),
        trt_cache_dir=os.path.join(trt_cache_dir, cache_key),
        max_batch_size=max_batch_size,
        max_seq_len=max_tokens,
    )
    for name, opts in plan.providers:
        if name == "TensorrtExecutionProvider":
            os.makedirs(str(opts["trt_engine_cache_path"]), exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    # Spinning worker threads would burn the cores the event loop and tokenizer need between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(root / plan.file),
        sess_options=so,
        providers=[name for name, _ in plan.providers],
        provider_options=[dict(opts) for _, opts in plan.providers],
    )
    clf = Classifier(
        artifact_dir=root,
        manifest=manifest,
        plan=plan,
        session=session,
        tokenizer=_tokenizer(root, manifest, max_tokens),
        max_tokens=max_tokens,
        max_batch_size=max_batch_size,
    )
    if clf.providers_in_use[0] != plan.provider_names[0]:
        log.warning("requested %s but ONNX Runtime runs %s", plan.provider_names[0], clf.providers_in_use[0])
    log.info(
        "loaded %s/%s variant=%s providers=%s (%s)",
        clf.name,
        clf.version,
        plan.variant,
        ",".join(clf.providers_in_use),
        plan.reason,
    )
    return clf
