"""Which model variant and which ONNX Runtime execution providers to use (a pure decision).

The preference is TensorRT (fp16, engines cached on disk so a restart does not rebuild them)
→ CUDA (fp16 variant, inputs/outputs through I/O binding) → CPU (int8 variant). Configuration
may override the variant, the providers, or both; an override that the machine or the artifact
cannot honour is refused at start-up rather than silently replaced.

``choose_execution`` takes plain data (what ONNX Runtime offers, how many GPUs the machine has,
the manifest's published variants) and returns an ``ExecutionPlan``; ``detect_hardware`` is the
thin adapter that reads the machine. ONNX Runtime may still fall back at session creation (a
TensorRT library missing at run time): the runtime logs and reports the providers the session
actually got, which is the truth the server exposes at ``/v1/model``.

Example::

    >>> p = choose_execution(available=["CPUExecutionProvider"], gpu_count=0,
    ...                      published={"fp32": {"file": "model.onnx"}, "int8": {"file": "model.int8.onnx"}})
    >>> p.variant, p.provider_names, p.io_binding
    ('int8', ('CPUExecutionProvider',), False)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Variants each provider runs well, best first. TensorRT builds its own fp16 engine from the
# fp32 graph (trt_fp16_enable), which it handles better than a graph already full of Casts.
# The int8 variant is dynamically quantized (MatMulInteger / DynamicQuantizeLinear): fast on
# CPU, unsupported by TensorRT and slow on CUDA, so GPUs never pick it by themselves.
VARIANT_PREFERENCE: dict[str, tuple[str, ...]] = {
    TRT: ("fp32", "fp16"),
    CUDA: ("fp16", "fp32"),
    CPU: ("int8", "fp32"),
}


class ProviderError(ValueError):
    """The requested variant/providers cannot run here (not published, not available)."""


@dataclass(frozen=True)
class Hardware:
    available_providers: tuple[str, ...]
    gpu_count: int


@dataclass(frozen=True)
class ExecutionPlan:
    variant: str
    file: str
    # (provider name, provider options) in ONNX Runtime's priority order.
    providers: tuple[tuple[str, Mapping[str, object]], ...]
    io_binding: bool
    reason: str

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.providers)

    @property
    def precision(self) -> str:
        """What the arithmetic runs in: TensorRT with fp16 enabled runs fp16 whatever the file."""
        if self.providers and self.providers[0][0] == TRT and self.providers[0][1].get("trt_fp16_enable"):
            return "fp16"
        return self.variant


def trt_options(
    cache_dir: str, *, input_names: Sequence[str], max_batch_size: int, max_seq_len: int
) -> dict[str, object]:
    """TensorRT EP options: fp16, engine + timing caches in ``cache_dir`` (kept across restarts),
    and one optimisation profile spanning every shape the server can send, so that a new batch
    shape never triggers an engine rebuild in the middle of serving."""

    def shapes(b: int, s: int) -> str:
        return ",".join(f"{name}:{b}x{s}" for name in input_names)

    return {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache_dir,
        "trt_max_workspace_size": 2 * 1024**3,
        "trt_profile_min_shapes": shapes(1, 1),
        "trt_profile_opt_shapes": shapes(max_batch_size, max(1, max_seq_len // 4)),
        "trt_profile_max_shapes": shapes(max_batch_size, max_seq_len),
    }


def choose_execution(
    *,
    available: Sequence[str],
    gpu_count: int,
    published: Mapping[str, Mapping],
    variant: str = "",
    providers: Sequence[str] = (),
    trt_cache_dir: str = "/var/cache/nlpfleet/trt",
    input_names: Sequence[str] = BERT_INPUTS,
    max_batch_size: int = 32,
    max_seq_len: int = 128,
) -> ExecutionPlan:
    """Pick the variant file and the provider chain.

    ``available``: ``onnxruntime.get_available_providers()``; ``gpu_count``: GPUs the machine
    has (a GPU build of ONNX Runtime lists CUDA even where there is no GPU); ``published``: the
    manifest's variants that passed the parity gate; ``variant``/``providers``: overrides.

    >>> gpu = [TRT, CUDA, CPU]
    >>> pub = {"fp32": {"file": "m.onnx"}, "fp16": {"file": "m16.onnx"}, "int8": {"file": "m8.onnx"}}
    >>> p = choose_execution(available=gpu, gpu_count=1, published=pub)
    >>> p.provider_names, p.variant, p.precision
    (('TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider'), 'fp32', 'fp16')
    >>> choose_execution(available=[CUDA, CPU], gpu_count=1, published=pub).variant
    'fp16'
    >>> choose_execution(available=gpu, gpu_count=0, published=pub).provider_names
    ('CPUExecutionProvider',)
    """
    if not published:
        raise ProviderError("the artifact has no published variant")
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise ProviderError(
                f"provider(s) {', '.join(missing)} not available (have {', '.join(available)})"
            )
        if gpu_count == 0 and any(p in GPU_PROVIDERS for p in providers):
            raise ProviderError(f"provider(s) {', '.join(providers)} need a GPU and this machine has none")
        chain = tuple(providers)
        why = "providers set by configuration"
    elif gpu_count > 0 and TRT in available and CUDA in available:
        chain, why = (TRT, CUDA, CPU), f"{gpu_count} GPU(s) and TensorRT available"
    elif gpu_count > 0 and CUDA in available:
        chain, why = (CUDA, CPU), f"{gpu_count} GPU(s), CUDA available, no TensorRT"
    else:
        chain = (CPU,)
        why = "no GPU" if gpu_count == 0 else "GPU present but this onnxruntime has no GPU provider"
    if CPU not in chain:
        chain = (*chain, CPU)  # ONNX Runtime places unsupported nodes on CPU anyway; say so

    if variant:
        if variant not in published:
            raise ProviderError(f"variant {variant!r} is not published (have {', '.join(sorted(published))})")
        chosen, vwhy = variant, "variant set by configuration"
    else:
        prefs = VARIANT_PREFERENCE[chain[0]]
        chosen = next((v for v in prefs if v in published), None)
        if chosen is None:
            chosen = next(iter(published))
            vwhy = f"none of {'/'.join(prefs)} published for {chain[0]}; using {chosen}"
        else:
            vwhy = f"best published variant for {chain[0]}"

    opts: list[tuple[str, Mapping[str, object]]] = []
    for name in chain:
        if name == TRT:
            o = trt_options(
                trt_cache_dir, input_names=input_names, max_batch_size=max_batch_size, max_seq_len=max_seq_len
            )
        elif name == CUDA:
            o = {"device_id": 0}
        else:
            o = {}
        opts.append((name, o))
    return ExecutionPlan(
        variant=chosen,
        file=str(published[chosen]["file"]),
        providers=tuple(opts),
        io_binding=chain[0] in GPU_PROVIDERS,
        reason=f"{why}; {vwhy}",
    )


def detect_hardware() -> Hardware:
    """Read the machine: the providers this onnxruntime build offers and the NVIDIA GPUs the
    driver exposes (``/proc/driver/nvidia/gpus`` has one entry per GPU; where that is hidden, as
    in some containers and micro-VMs, the ``/dev/nvidiaN`` device nodes are counted).

    A GPU build of ONNX Runtime lists TensorRT whether or not the TensorRT libraries are
    installed; a session asked for it then fails over to CUDA with the *fp32* graph (the plan
    picked fp32 for TensorRT). So TensorRT counts as available only when its runtime loads."""
    import onnxruntime as ort

    available = tuple(ort.get_available_providers())
    if TRT in available and not tensorrt_loadable():
        available = tuple(p for p in available if p != TRT)
    return Hardware(available_providers=available, gpu_count=count_gpus())


def count_gpus(proc_dir: str = "/proc/driver/nvidia/gpus", dev_dir: str = "/dev") -> int:
    """NVIDIA GPUs on this machine (0 when there is no driver)."""
    try:
        return len(os.listdir(proc_dir))
    except OSError:
        pass
    try:
        return sum(1 for n in os.listdir(dev_dir) if n.startswith("nvidia") and n[6:].isdigit())
    except OSError:
        return 0


def tensorrt_loadable() -> bool:
    """Whether the TensorRT runtime (``libnvinfer``) can be loaded: from the library path, or
    from the ``tensorrt_libs`` wheel's folder (``pip install tensorrt-cu13``), which ONNX Runtime's
    TensorRT provider also finds."""
    import ctypes
    import importlib.util

    names = ("libnvinfer.so.10", "libnvinfer.so")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    spec = importlib.util.find_spec("tensorrt_libs")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in names:
            try:
                ctypes.CDLL(os.path.join(folder, name))
                return True
            except OSError:
                pass
    return False
