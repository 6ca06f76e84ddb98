"""Choose the EC2 instance for a job (pure: no I/O, no clock).

Given a ``Workload`` (what the job computes and its limits) the planner estimates, for every
instance type in ``catalog.CATALOG``, the memory the job needs there, how long it runs and what
it costs, then keeps the types that fit memory, finish before the deadline and stay under the
hourly-cost limit, cheapest first. The first is the choice; the rest are the fallbacks a launch
walks through when EC2 has no capacity.

The estimates (figures and formulas a reviewer can check):

- Training memory per GPU (Adam, torch AMP keeps fp32 weights): weights 4 B/param,
  gradients 4 B/param, Adam moments 8 B/param (Rajbhandari et al., ZeRO, 2020: 16 B/param),
  plus activations per layer ``s*b*h*(34 + 5*a*s/h)`` bytes at 16-bit (Korthikanti et al.,
  2022; doubled for fp32), plus 1.5 GB CUDA context/allocator slack. DDP replicates the model
  states on every GPU and splits the batch; when even a micro-batch of one does not fit, no
  instance fits (sharding, FSDP/ZeRO-3, is not something the training worker does).
- Training time: ``6 * params * tokens * epochs / (peak FLOPS * utilization)`` (Kaplan et al.,
  2020), utilization 0.35 on GPUs (0.9 scaling efficiency per extra GPU with DDP) and 0.30 on
  CPUs; tokens = examples x sequence length (padded).
- Inference time: ``2 * params * tokens / (peak * utilization)``; a corpus holds about
  4 bytes per token (English WordPiece/BPE).
- Preprocessing: throughput per vCPU measured on this project's ``preprocess`` job
  (``PREPROCESS_BYTES_PER_S_PER_VCPU``) up to the single reader/writer's ceiling
  (``PREPROCESS_MAX_BYTES_PER_S``), memory 2 GB + 0.5 GB per worker, plus 2x the
  corpus when it must sit in memory; scratch 3x the corpus (input, shards with token ids).
- Every job pays ``BOOT_H`` of instance time before it computes (boot, AMI start, S3 fetch):
  that is why a small job lands on a small instance rather than a fast one.

Example::

    >>> p = plan(Workload(kind="train", params=110_000_000, layers=12, hidden=768, heads=12,
    ...                   examples=10_000, epochs=3, seq_len=128, batch_size=32))
    >>> p.choice.instance.name, p.choice.strategy
    ('g4dn.xlarge', 'single-gpu')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from chalicelib.catalog import CATALOG, InstanceType

GB = 1e9
BOOT_H = 0.1
GPU_TRAIN_UTIL = 0.35
GPU_INFER_UTIL = 0.25
CPU_UTIL = 0.30
DDP_EFFICIENCY = 0.9
GPU_USABLE = 0.92
CUDA_OVERHEAD_GB = 1.5
HOST_BASE_GB = 2.0
BYTES_PER_TOKEN = 4.0
# Measured (docs/control-plane.md): nlpfleet.jobs_preprocess on banking77 (CSV → normalise →
# MiniLM WordPiece → JSONL shards): 1.1 MB/s of corpus per worker vCPU (CPU time), and its
# single reader/writer process spends 0.08 s CPU per 0.76 MB (~9 MB/s): the job's ceiling.
PREPROCESS_BYTES_PER_S_PER_VCPU = 1.1e6
PREPROCESS_MAX_BYTES_PER_S = 9.0e6
EBS_SCRATCH_MAX_GB = 1000.0
KINDS = ("train", "preprocess", "infer")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Workload:
    """What a job computes and its limits. Sizes in plain units (parameters, bytes, hours)."""

    kind: str
    params: int = 0
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    seq_len: int = 128
    batch_size: int = 32
    epochs: int = 1
    examples: int = 0
    precision: str = "fp16"
    corpus_bytes: int = 0
    in_memory: bool = False
    deadline_h: float | None = None
    max_hourly_usd: float | None = None

    def shape(self) -> tuple[int, int, int]:
        """Layers, hidden size and heads; derived from the parameter count when not given
        (params ~ 12 * layers * hidden^2 with hidden ~ 64 * layers, heads = hidden / 64)."""
        layers, hidden, heads = self.layers, self.hidden, self.heads
        if not layers or not hidden:
            layers = max(1, round((max(self.params, 1) / 49152) ** (1 / 3)))
            hidden = max(64, round(math.sqrt(max(self.params, 1) / (12 * layers))))
        if not heads:
            heads = max(1, hidden // 64)
        return layers, hidden, heads

    def tokens(self) -> float:
        if self.examples:
            return float(self.examples) * self.seq_len
        return self.corpus_bytes / BYTES_PER_TOKEN


@dataclass(frozen=True)
class Candidate:
    instance: InstanceType
    strategy: str  # cpu | single-gpu | ddp
    procs: int
    hours: float
    cost_usd: float
    memory_need_gb: float
    memory_have_gb: float
    gpu_memory_need_gb: float = 0.0
    micro_batch: int = 0
    grad_accum: int = 0
    scratch_need_gb: float = 0.0

    def describe(self) -> dict:
        d = self.instance.describe()
        d.update(
            strategy=self.strategy,
            processes=self.procs,
            estimated_hours=round(self.hours, 3),
            estimated_cost_usd=round(self.cost_usd, 4),
            host_memory_need_gb=round(self.memory_need_gb, 2),
        )
        if self.instance.gpu:
            d["gpu_memory_need_gb"] = round(self.gpu_memory_need_gb, 2)
        if self.micro_batch:
            d["micro_batch_per_gpu"] = self.micro_batch
            d["gradient_accumulation"] = self.grad_accum
        if self.scratch_need_gb:
            d["scratch_need_gb"] = round(self.scratch_need_gb, 1)
        return d


@dataclass(frozen=True)
class Plan:
    workload: Workload
    choice: Candidate | None
    candidates: tuple[Candidate, ...]
    rejected: tuple[tuple[str, str], ...]
    estimate: dict
    reasoning: tuple[str, ...]

    def describe(self, alternatives: int = 5) -> dict:
        return {
            "choice": self.choice.describe() if self.choice else None,
            "alternatives": [c.describe() for c in self.candidates[1 : 1 + alternatives]],
            "considered": len(self.candidates) + len(self.rejected),
            "feasible": len(self.candidates),
            "rejected": {name: why for name, why in self.rejected},
            "estimate": self.estimate,
            "reasoning": list(self.reasoning),
        }


# -- estimates ---------------------------------------------------------------------------


def model_state_bytes(params: int) -> dict:
    """Adam with fp32 master weights (plain fp32 or torch AMP): 16 bytes per parameter."""
    return {"weights": 4.0 * params, "gradients": 4.0 * params, "optimizer": 8.0 * params}


def activation_bytes(w: Workload, micro_batch: int) -> float:
    """Activation memory for one forward/backward of ``micro_batch`` sequences."""
    layers, hidden, heads = w.shape()
    s = w.seq_len
    per_layer = s * micro_batch * hidden * (34 + 5 * heads * s / hidden)
    scale = 2.0 if w.precision == "fp32" else 1.0
    return layers * per_layer * scale


def training_flops(w: Workload) -> float:
    return 6.0 * w.params * w.tokens() * w.epochs


def inference_flops(w: Workload) -> float:
    return 2.0 * w.params * w.tokens()


def _gpu_peak_tflops(t: InstanceType, precision: str) -> float:
    if precision == "fp32":
        return t.gpu.fp32_tflops
    return t.gpu.fp16_tflops


def _cost(t: InstanceType, compute_h: float) -> tuple[float, float]:
    hours = BOOT_H + compute_h
    return hours, hours * t.hourly_usd


# -- per-kind evaluation: a Candidate or the reason the type does not fit ------------------


def _eval_train(w: Workload, t: InstanceType) -> Candidate | str:
    states = sum(model_state_bytes(w.params).values())
    flops = training_flops(w)
    if t.gpu is None:
        need = HOST_BASE_GB + (states + activation_bytes(w, w.batch_size)) / GB
        if need > t.memory_gb:
            return f"needs {need:.1f} GB host memory for CPU training, has {t.memory_gb:g}"
        hours, cost = _cost(t, flops / (t.cpu_tflops * 1e12 * CPU_UTIL) / 3600)
        return Candidate(t, "cpu", 1, hours, cost, need, t.memory_gb)
    if w.precision == "bf16" and not t.gpu.bf16:
        return f"{t.gpu.model} has no bf16"
    n = t.gpu_count
    usable = t.gpu.memory_gb * GPU_USABLE
    per_gpu_batch = math.ceil(w.batch_size / n)
    micro = per_gpu_batch  # halved (gradient accumulation) until a micro-batch fits
    while True:
        gpu_need = (states + activation_bytes(w, micro)) / GB + CUDA_OVERHEAD_GB
        if gpu_need <= usable or micro == 1:
            break
        micro = math.ceil(micro / 2)
    if gpu_need > usable:
        return (
            f"needs {gpu_need:.1f} GB per GPU even at micro-batch 1 (model states "
            f"{states / GB:.1f} GB), {t.gpu.model} has {t.gpu.memory_gb:g}"
        )
    host_need = HOST_BASE_GB + n * (4.0 * w.params / GB + 1.5)
    if host_need > t.memory_gb:
        return f"needs {host_need:.1f} GB host memory for {n} workers, has {t.memory_gb:g}"
    eff = DDP_EFFICIENCY if n > 1 else 1.0
    rate = _gpu_peak_tflops(t, w.precision) * 1e12 * n * GPU_TRAIN_UTIL * eff
    hours, cost = _cost(t, flops / rate / 3600)
    return Candidate(
        t,
        "ddp" if n > 1 else "single-gpu",
        n,
        hours,
        cost,
        host_need,
        t.memory_gb,
        gpu_need,
        micro,
        math.ceil(per_gpu_batch / micro),
    )


def _eval_infer(w: Workload, t: InstanceType) -> Candidate | str:
    weights = 4.0 * w.params / GB
    host_need = HOST_BASE_GB + 3 * weights
    if host_need > t.memory_gb:
        return f"needs {host_need:.1f} GB host memory, has {t.memory_gb:g}"
    flops = inference_flops(w)
    if t.gpu is None:
        hours, cost = _cost(t, flops / (t.cpu_tflops * 1e12 * CPU_UTIL) / 3600)
        return Candidate(t, "cpu", 1, hours, cost, host_need, t.memory_gb)
    gpu_need = 2 * weights + CUDA_OVERHEAD_GB
    if gpu_need > t.gpu.memory_gb * GPU_USABLE:
        return f"needs {gpu_need:.1f} GB per GPU, {t.gpu.model} has {t.gpu.memory_gb:g}"
    rate = _gpu_peak_tflops(t, w.precision) * 1e12 * t.gpu_count * GPU_INFER_UTIL
    hours, cost = _cost(t, flops / rate / 3600)
    strategy = "single-gpu" if t.gpu_count == 1 else "ddp"
    return Candidate(t, strategy, t.gpu_count, hours, cost, host_need, t.memory_gb, gpu_need)


def _eval_preprocess(w: Workload, t: InstanceType) -> Candidate | str:
    if t.gpu is not None:
        return "preprocessing runs on CPU families: a GPU would sit idle"
    need = HOST_BASE_GB + 0.5 * t.vcpus + (2.0 * w.corpus_bytes / GB if w.in_memory else 0.0)
    if need > t.memory_gb:
        why = " with the corpus in memory" if w.in_memory else ""
        return f"needs {need:.1f} GB host memory{why}, has {t.memory_gb:g}"
    scratch = 3.0 * w.corpus_bytes / GB
    if scratch > EBS_SCRATCH_MAX_GB and t.local_storage_gb < scratch:
        return f"needs {scratch:,.0f} GB of local scratch, has {t.local_storage_gb:,} GB"
    rate = min(PREPROCESS_BYTES_PER_S_PER_VCPU * t.vcpus, PREPROCESS_MAX_BYTES_PER_S)
    compute_h = w.corpus_bytes / rate / 3600
    hours, cost = _cost(t, compute_h)
    return Candidate(t, "cpu", t.vcpus, hours, cost, need, t.memory_gb, scratch_need_gb=scratch)


_EVAL = {"train": _eval_train, "infer": _eval_infer, "preprocess": _eval_preprocess}


def _estimate(w: Workload) -> dict:
    if w.kind == "train":
        states = model_state_bytes(w.params)
        return {
            "model_states_gb": {k: round(v / GB, 3) for k, v in states.items()},
            "activations_gb_per_sequence": round(activation_bytes(w, 1) / GB, 4),
            "tokens": w.tokens(),
            "total_flops": training_flops(w),
            "formula": "6 x params x tokens x epochs / (peak FLOPS x utilization)",
        }
    if w.kind == "infer":
        return {
            "tokens": w.tokens(),
            "total_flops": inference_flops(w),
            "model_weights_gb": round(4.0 * w.params / GB, 3),
            "formula": "2 x params x tokens / (peak FLOPS x utilization)",
        }
    return {
        "corpus_gb": round(w.corpus_bytes / GB, 3),
        "scratch_gb": round(3.0 * w.corpus_bytes / GB, 3),
        "in_memory": w.in_memory,
        "throughput_bytes_per_s_per_vcpu": PREPROCESS_BYTES_PER_S_PER_VCPU,
        "throughput_ceiling_bytes_per_s": PREPROCESS_MAX_BYTES_PER_S,
    }


def plan(w: Workload, catalog: tuple[InstanceType, ...] = CATALOG) -> Plan:
    """Every catalog type evaluated; the feasible ones cheapest first (ties: faster first)."""
    if w.kind not in _EVAL:
        raise ValueError(f"unknown workload kind {w.kind!r}")
    feasible: list[Candidate] = []
    rejected: list[tuple[str, str]] = []
    for t in catalog:
        result = _EVAL[w.kind](w, t)
        if isinstance(result, str):
            rejected.append((t.name, result))
        elif w.max_hourly_usd is not None and t.hourly_usd > w.max_hourly_usd:
            rejected.append((t.name, f"${t.hourly_usd:g}/h is over the ${w.max_hourly_usd:g}/h limit"))
        elif w.deadline_h is not None and result.hours > w.deadline_h:
            rejected.append((t.name, f"takes ~{result.hours:.2f} h, deadline is {w.deadline_h:g} h"))
        else:
            feasible.append(result)
    feasible.sort(key=lambda c: (round(c.cost_usd, 6), c.hours, c.instance.hourly_usd, c.instance.name))
    return Plan(
        w,
        feasible[0] if feasible else None,
        tuple(feasible),
        tuple(rejected),
        _estimate(w),
        _reasoning(w, feasible, rejected),
    )


def _reasoning(w: Workload, feasible: list[Candidate], rejected: list[tuple[str, str]]) -> tuple[str, ...]:
    lines = []
    if w.kind == "train":
        states = sum(model_state_bytes(w.params).values()) / GB
        lines.append(
            f"training {w.params / 1e6:,.0f}M parameters needs {states:.1f} GB of model states "
            f"(16 B/param with Adam) on every GPU, plus activations"
        )
    elif w.kind == "preprocess":
        lines.append(f"preprocessing {w.corpus_bytes / GB:,.2f} GB runs on CPU families")
        if w.in_memory:
            lines.append("the corpus must sit in memory: memory-optimized types are the cheapest per GB")
        if 3.0 * w.corpus_bytes / GB > EBS_SCRATCH_MAX_GB:
            lines.append(
                f"scratch over {EBS_SCRATCH_MAX_GB:,.0f} GB: only types with that much local storage"
            )
    else:
        lines.append(f"classifying ~{w.tokens():,.0f} tokens with a {w.params / 1e6:,.0f}M-parameter model")
    if not feasible:
        lines.append(f"none of {len(rejected)} types fits")
        return tuple(lines)
    c = feasible[0]
    lines.append(
        f"{c.instance.name} ({c.strategy}) is the cheapest of {len(feasible)} feasible types: "
        f"~{c.hours:.2f} h, ~${c.cost_usd:.2f} at ${c.instance.hourly_usd:g}/h on-demand"
    )
    if c.strategy == "ddp" and w.kind == "train":
        single = [name for name, why in rejected if name in _SINGLE_GPU]
        if single:
            lines.append("single-GPU types were ruled out (memory or deadline), so DDP across GPUs")
    if w.deadline_h is not None:
        lines.append(
            f"deadline {w.deadline_h:g} h ruled out {sum('deadline' in r for _, r in rejected)} types"
        )
    return tuple(lines)


_SINGLE_GPU = {t.name for t in CATALOG if t.gpu_count == 1}


def with_limits(
    w: Workload, *, deadline_h: float | None = None, max_hourly_usd: float | None = None
) -> Workload:
    return replace(w, deadline_h=deadline_h, max_hourly_usd=max_hourly_usd)
