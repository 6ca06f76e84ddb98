"""Settings of the inference server: one frozen dataclass, read from a mapping.

``Settings.from_env(os.environ)`` in production, a plain dict in tests. Each field ``x`` is read
from ``NLPFLEET_X`` (``max_wait_ms`` from ``NLPFLEET_MAX_WAIT_MS``); the CLI flags of
``python -m inference.server`` are the same names (``--max-wait-ms``) and win over the
environment. A missing required key or a bad value fails at start-up, naming the key.

Example::

    >>> s = Settings.from_env({"NLPFLEET_MODEL": "/m", "NLPFLEET_MAX_WAIT_MS": "5"})
    >>> s.model, s.max_wait_ms, s.max_batch_size
    ('/m', 5.0, 32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "NLPFLEET_"
TOKEN_OVERFLOW_POLICIES = ("truncate", "reject")


class SettingsError(ValueError):
    """A setting that is missing or cannot be used; the message names the environment key."""


@dataclass(frozen=True)
class Settings:
    # The artifact to serve: a local directory or s3://bucket/models/name/version/.
    model: str
    host: str = "0.0.0.0"
    port: int = 8080
    # Execution overrides; empty means "choose from the hardware and the manifest".
    variant: str = ""
    providers: tuple[str, ...] = ()
    # Batches run concurrently (run_workers), each on intra_op_threads threads; 0 = auto
    # (threads_for): on CPU one single-threaded run per core, on a GPU one run.
    intra_op_threads: int = 0
    run_workers: int = 0
    # On CPU with one single-threaded run per core (the auto setting), pin runner i to core i
    # (1) or leave placement to the OS (0, the default: measured both ways, see docs/serving.md).
    pin_runners: int = 0
    # Dynamic batching: padded cost of a batch = longest sequence x texts. 0 = by provider
    # (auto_batch_tokens): on CPU every padded token costs, so small length-grouped batches win;
    # a GPU runs a big batch in about the time of a small one.
    max_batch_size: int = 32
    max_batch_tokens: int = 0
    max_wait_ms: float = 2.0
    # A model run's fixed cost, in padded tokens' worth, which the batcher weighs against padding
    # (inference.batching.take_batch). 0 = measured on the model at warm-up (Classifier.run_cost).
    batch_run_overhead_tokens: float = 0.0
    # Admission: requests past this many in flight are refused at once with 429.
    max_inflight_requests: int = 512
    # Request limits (413 past them). Tokens past max_tokens_per_text are truncated or rejected.
    max_texts_per_request: int = 64
    max_chars_per_text: int = 2000
    max_tokens_per_text: int = 128
    token_overflow: str = "truncate"
    # Shutdown: after SIGTERM keep admitting for drain_grace_s (the load balancer sees /readyz
    # 503 and stops sending), then refuse new work and wait up to drain_timeout_s for in-flight.
    drain_grace_s: float = 0.0
    drain_timeout_s: float = 30.0
    # Where s3:// artifacts are downloaded and where TensorRT keeps its engines across restarts.
    model_cache_dir: str = "/var/lib/nlpfleet/models"
    trt_cache_dir: str = "/var/cache/nlpfleet/trt"
    s3_endpoint_url: str = ""
    warmup_rounds: int = 3
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``NLPFLEET_*`` keys of ``env``; unknown keys are ignored."""
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            key = PREFIX + f.name.upper()
            if key not in env:
                if f.default is dataclasses.MISSING:
                    raise SettingsError(f"{key} is required")
                continue
            values[f.name] = _parse(key, f.type, env[key])
        return cls(**values)._validated()

    def _validated(self) -> Settings:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise SettingsError(f"{PREFIX}{key.upper()}: {why}")

        need(bool(self.model), "model", "must name a directory or an s3:// URI")
        need(0 < self.port < 65536, "port", "must be in 1..65535")
        need(self.variant in ("", "fp32", "int8", "fp16"), "variant", "must be fp32, int8 or fp16")
        for key in ("max_batch_size", "max_inflight_requests", "max_texts_per_request",
                    "max_chars_per_text", "max_tokens_per_text"):  # fmt: skip
            need(getattr(self, key) > 0, key, "must be positive")
        need(self.max_wait_ms >= 0, "max_wait_ms", "must be >= 0")
        need(self.batch_run_overhead_tokens >= 0, "batch_run_overhead_tokens", "must be >= 0 (0 = measure)")
        need(self.intra_op_threads >= 0, "intra_op_threads", "must be >= 0 (0 = auto)")
        need(self.run_workers >= 0, "run_workers", "must be >= 0 (0 = auto)")
        need(self.drain_grace_s >= 0 and self.drain_timeout_s > 0, "drain_timeout_s", "must be positive")
        need(self.token_overflow in TOKEN_OVERFLOW_POLICIES, "token_overflow", "must be truncate or reject")
        # One text of the longest allowed length must always fit in a batch on its own.
        need(
            self.max_batch_tokens == 0 or self.max_batch_tokens >= self.max_tokens_per_text,
            "max_batch_tokens",
            f"must be >= max_tokens_per_text ({self.max_tokens_per_text})",
        )
        return self

    def threads_for(self, *, on_gpu: bool, cpus: int) -> tuple[int, int]:
        """``(run_workers, intra_op_threads)`` in force; 0 = ONNX Runtime's default threads.

        On CPU, runs x threads fill the cores, and by default every run is single-threaded:
        a BERT-small batch of ~10 short texts spends much of a multi-threaded run waiting at
        the threads' barriers (on 2 cores, two 1-thread runs side by side served 1.7x the
        requests of one 2-thread run). On a GPU one run at a time feeds the device.

        >>> s = Settings.from_env({"NLPFLEET_MODEL": "/m"})
        >>> s.threads_for(on_gpu=False, cpus=2), s.threads_for(on_gpu=True, cpus=8)
        ((2, 1), (1, 0))
        >>> Settings.from_env({"NLPFLEET_MODEL": "/m", "NLPFLEET_INTRA_OP_THREADS": "4"}).threads_for(on_gpu=False, cpus=8)
        (2, 4)
        """
        if on_gpu:
            return self.run_workers or 1, self.intra_op_threads
        if self.run_workers and self.intra_op_threads:
            return self.run_workers, self.intra_op_threads
        if self.run_workers:
            return self.run_workers, max(1, cpus // self.run_workers)
        threads = self.intra_op_threads or 1
        return max(1, cpus // threads), threads

    def batch_tokens_for(self, provider: str, max_tokens_per_text: int) -> int:
        """The token budget in force: the configured one, or the provider's default.

        >>> s = Settings.from_env({"NLPFLEET_MODEL": "/m"})
        >>> s.batch_tokens_for("CPUExecutionProvider", 128), s.batch_tokens_for("CUDAExecutionProvider", 128)
        (256, 16384)
        """
        if self.max_batch_tokens:
            return self.max_batch_tokens
        auto = AUTO_BATCH_TOKENS.get(provider, AUTO_BATCH_TOKENS["CPUExecutionProvider"])
        return max(auto, max_tokens_per_text)


# On CPU a run costs about a fixed ~0.9 ms (the int8 MiniLM; mostly streaming the weights) plus
# ~53 us per padded token (one thread, this 2-core Xeon), so a bigger batch amortises the fixed
# part but pays for more padding. With Banking77 questions (~16 tokens) the batches the server
# forms cost, relative to length-sorted batches of 8-16, about the same at 128 and 256 tokens
# with 64 requests in flight (within the noise of this shared machine), and less at 256 once
# 128-256 are in flight (deeper queue, fuller batches with little padding): 256 it is. (The
# earlier 128 was measured on an int8 graph whose padded positions were far dearer.)
AUTO_BATCH_TOKENS = {
    "CPUExecutionProvider": 256,
    "CUDAExecutionProvider": 16384,
    "TensorrtExecutionProvider": 16384,
}


def _parse(key: str, typ: object, raw: str) -> object:
    raw = raw.strip()
    try:
        if typ in ("int", int):
            return int(raw)
        if typ in ("float", float):
            return float(raw)
        if typ in ("tuple[str, ...]",):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError:
        raise SettingsError(f"{key}: cannot parse {raw!r} as {typ}") from None


def cli_to_env(args: Mapping[str, object]) -> dict[str, str]:
    """CLI values (argparse dest names equal to field names, ``None`` when not given) as
    ``NLPFLEET_*`` keys, so flags and environment go through one parser."""
    out: dict[str, str] = {}
    for name, value in args.items():
        if value is None:
            continue
        out[PREFIX + name.upper()] = ",".join(value) if isinstance(value, list | tuple) else str(value)
    return out


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Settings))
