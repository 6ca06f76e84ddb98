"""The EC2 instance catalog the planner chooses from (pure data, stdlib only).

Source of the figures:
- vCPUs, memory, GPU model/count/memory, local instance storage: the AWS EC2 instance type
  pages (aws.amazon.com/ec2/instance-types/, "Accelerated Computing", "Storage Optimized",
  "Memory Optimized" tabs), as published in 2024.
- On-demand prices: AWS EC2 On-Demand pricing, region us-east-1, Linux, USD per hour, as
  published through 2024 (before the 2025 P4/P5 price reductions). They were transcribed,
  not fetched at run time (the build machine has no internet): re-check them before
  trusting a dollar figure, and override ``PRICE_REGION`` figures for other regions.
- GPU peak TFLOPS: NVIDIA data sheets (dense tensor-core fp16; fp32 without tensor cores):
  T4 65/8.1, A10G 70/31.2 (AWS's A10G figure), V100 SXM2 125/15.7, A100 40GB SXM 312/19.5.
- CPU peak: fp32 FLOP/cycle x all-core turbo: AVX-512 with two FMA units (Skylake/Cascade
  Lake/Ice Lake) is 32 FLOP/cycle/core, AVX2 (Haswell/Broadwell) 16; per vCPU (a hyperthread)
  that is half a core.

The catalog starts at ``xlarge``: the data-plane AMI loads torch or onnxruntime plus a model
and its page cache, and 2-vCPU/4-GB ``large`` sizes spend most of a job swapping.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICE_REGION = "us-east-1"
PRICES_AS_OF = "2024 (AWS on-demand list prices, Linux)"


@dataclass(frozen=True)
class Gpu:
    model: str
    memory_gb: float
    fp16_tflops: float
    fp32_tflops: float
    bf16: bool


T4 = Gpu("NVIDIA T4", 16, 65.0, 8.1, False)
A10G = Gpu("NVIDIA A10G", 24, 70.0, 31.2, True)
V100 = Gpu("NVIDIA V100", 16, 125.0, 15.7, False)
A100 = Gpu("NVIDIA A100 40GB", 40, 312.0, 19.5, True)


@dataclass(frozen=True)
class InstanceType:
    name: str
    family: str
    category: str  # compute | general | memory | gpu | storage
    vcpus: int
    memory_gb: float
    hourly_usd: float
    cpu_gflops_per_vcpu: float
    gpu: Gpu | None = None
    gpu_count: int = 0
    local_storage_gb: int = 0
    local_storage_kind: str = ""  # nvme-ssd | hdd | ""

    @property
    def gpu_memory_gb(self) -> float:
        return self.gpu.memory_gb if self.gpu else 0.0

    @property
    def cpu_tflops(self) -> float:
        return self.vcpus * self.cpu_gflops_per_vcpu / 1000.0

    def fp16_tflops(self) -> float:
        return self.gpu.fp16_tflops * self.gpu_count if self.gpu else 0.0

    def describe(self) -> dict:
        d = {
            "instance_type": self.name,
            "family": self.family,
            "category": self.category,
            "vcpus": self.vcpus,
            "memory_gb": self.memory_gb,
            "hourly_usd": self.hourly_usd,
            "gpu": None,
            "local_storage_gb": self.local_storage_gb,
            "local_storage_kind": self.local_storage_kind or None,
        }
        if self.gpu:
            d["gpu"] = {
                "model": self.gpu.model,
                "count": self.gpu_count,
                "memory_gb": self.gpu.memory_gb,
                "fp16_tflops": self.gpu.fp16_tflops,
            }
        return d


# Per-vCPU fp32 GFLOPS: AVX-512 (32 FLOP/cycle/core) at ~3.0 GHz (Skylake/Cascade Lake) and
# ~3.5 GHz (Ice Lake); AVX2 (16) at ~2.3-2.7 GHz (Broadwell/Haswell); half a core per vCPU.
_SKX, _ICX, _BDW, _HSW = 48.0, 56.0, 18.4, 19.2


def _i(name, family, cat, vcpus, mem, usd, gflops, gpu=None, n=0, disk=0, kind=""):
    return InstanceType(name, family, cat, vcpus, mem, usd, gflops, gpu, n, disk, kind)


CATALOG: tuple[InstanceType, ...] = (
    # compute optimized
    _i("c5.xlarge", "c5", "compute", 4, 8, 0.17, _SKX),
    _i("c5.2xlarge", "c5", "compute", 8, 16, 0.34, _SKX),
    _i("c5.4xlarge", "c5", "compute", 16, 32, 0.68, _SKX),
    _i("c5.9xlarge", "c5", "compute", 36, 72, 1.53, _SKX),
    _i("c6i.xlarge", "c6i", "compute", 4, 8, 0.17, _ICX),
    _i("c6i.2xlarge", "c6i", "compute", 8, 16, 0.34, _ICX),
    _i("c6i.4xlarge", "c6i", "compute", 16, 32, 0.68, _ICX),
    _i("c6i.8xlarge", "c6i", "compute", 32, 64, 1.36, _ICX),
    _i("c6i.16xlarge", "c6i", "compute", 64, 128, 2.72, _ICX),
    # general purpose
    _i("m5.xlarge", "m5", "general", 4, 16, 0.192, _SKX),
    _i("m5.2xlarge", "m5", "general", 8, 32, 0.384, _SKX),
    _i("m5.4xlarge", "m5", "general", 16, 64, 0.768, _SKX),
    _i("m5.8xlarge", "m5", "general", 32, 128, 1.536, _SKX),
    _i("m6i.xlarge", "m6i", "general", 4, 16, 0.192, _ICX),
    _i("m6i.2xlarge", "m6i", "general", 8, 32, 0.384, _ICX),
    _i("m6i.4xlarge", "m6i", "general", 16, 64, 0.768, _ICX),
    _i("m6i.8xlarge", "m6i", "general", 32, 128, 1.536, _ICX),
    # memory optimized
    _i("r5.2xlarge", "r5", "memory", 8, 64, 0.504, _SKX),
    _i("r5.8xlarge", "r5", "memory", 32, 256, 2.016, _SKX),
    _i("r5.16xlarge", "r5", "memory", 64, 512, 4.032, _SKX),
    _i("r6i.2xlarge", "r6i", "memory", 8, 64, 0.504, _ICX),
    _i("r6i.8xlarge", "r6i", "memory", 32, 256, 2.016, _ICX),
    _i("r6i.16xlarge", "r6i", "memory", 64, 512, 4.032, _ICX),
    _i("r6i.32xlarge", "r6i", "memory", 128, 1024, 8.064, _ICX),
    _i("x2idn.16xlarge", "x2idn", "memory", 64, 1024, 6.669, _ICX, disk=1900, kind="nvme-ssd"),
    _i("x2idn.32xlarge", "x2idn", "memory", 128, 2048, 13.338, _ICX, disk=3800, kind="nvme-ssd"),
    # GPU
    _i("g4dn.xlarge", "g4dn", "gpu", 4, 16, 0.526, _SKX, T4, 1, 125, "nvme-ssd"),
    _i("g4dn.2xlarge", "g4dn", "gpu", 8, 32, 0.752, _SKX, T4, 1, 225, "nvme-ssd"),
    _i("g4dn.12xlarge", "g4dn", "gpu", 48, 192, 3.912, _SKX, T4, 4, 900, "nvme-ssd"),
    _i("g5.xlarge", "g5", "gpu", 4, 16, 1.006, _ICX, A10G, 1, 250, "nvme-ssd"),
    _i("g5.2xlarge", "g5", "gpu", 8, 32, 1.212, _ICX, A10G, 1, 450, "nvme-ssd"),
    _i("g5.12xlarge", "g5", "gpu", 48, 192, 5.672, _ICX, A10G, 4, 3800, "nvme-ssd"),
    _i("g5.48xlarge", "g5", "gpu", 192, 768, 16.288, _ICX, A10G, 8, 7600, "nvme-ssd"),
    _i("p3.2xlarge", "p3", "gpu", 8, 61, 3.06, _BDW, V100, 1),
    _i("p3.8xlarge", "p3", "gpu", 32, 244, 12.24, _BDW, V100, 4),
    _i("p3.16xlarge", "p3", "gpu", 64, 488, 24.48, _BDW, V100, 8),
    _i("p4d.24xlarge", "p4d", "gpu", 96, 1152, 32.7726, _SKX, A100, 8, 8000, "nvme-ssd"),
    # storage optimized
    _i("i3.2xlarge", "i3", "storage", 8, 61, 0.624, _BDW, disk=1900, kind="nvme-ssd"),
    _i("i3.8xlarge", "i3", "storage", 32, 244, 2.496, _BDW, disk=7600, kind="nvme-ssd"),
    _i("d2.2xlarge", "d2", "storage", 8, 61, 1.38, _HSW, disk=12000, kind="hdd"),
    _i("d2.8xlarge", "d2", "storage", 36, 244, 5.52, _HSW, disk=48000, kind="hdd"),
    _i("h1.4xlarge", "h1", "storage", 16, 64, 0.936, _BDW, disk=4000, kind="hdd"),
    _i("h1.16xlarge", "h1", "storage", 64, 256, 3.744, _BDW, disk=16000, kind="hdd"),
)

BY_NAME = {t.name: t for t in CATALOG}
