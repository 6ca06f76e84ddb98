"""Variant and execution-provider choice: what runs on which machine, and what overrides do."""

import pytest

from inference.providers import CPU, CUDA, TRT, ProviderError, choose_execution

ALL = {
    "fp32": {"file": "model.onnx"},
    "fp16": {"file": "model.fp16.onnx"},
    "int8": {"file": "model.int8.onnx"},
}
GPU_BUILD = [TRT, CUDA, CPU]


@pytest.mark.parametrize(
    "available, gpus, published, chain, variant, precision",
    [
        # GPU machine with TensorRT: fp32 graph, TensorRT builds an fp16 engine.
        (GPU_BUILD, 1, ALL, (TRT, CUDA, CPU), "fp32", "fp16"),
        # CUDA only: the fp16 variant.
        ([CUDA, CPU], 4, ALL, (CUDA, CPU), "fp16", "fp16"),
        # CUDA, fp16 failed the parity gate: fp32, never int8 on a GPU.
        ([CUDA, CPU], 1, {k: ALL[k] for k in ("fp32", "int8")}, (CUDA, CPU), "fp32", "fp32"),
        # A GPU build of onnxruntime on a machine without GPU: CPU, int8.
        (GPU_BUILD, 0, ALL, (CPU,), "int8", "int8"),
        ([CPU], 0, ALL, (CPU,), "int8", "int8"),
        # int8 failed the parity gate: fp32 on CPU (fp16 on CPU is slower than fp32).
        ([CPU], 0, {k: ALL[k] for k in ("fp32", "fp16")}, (CPU,), "fp32", "fp32"),
        # Only fp16 published: it is what there is.
        ([CPU], 0, {"fp16": ALL["fp16"]}, (CPU,), "fp16", "fp16"),
    ],
)
def test_choice_follows_hardware_and_manifest(available, gpus, published, chain, variant, precision):
    plan = choose_execution(available=available, gpu_count=gpus, published=published)
    assert plan.provider_names == chain
    assert plan.variant == variant
    assert plan.file == published[variant]["file"]
    assert plan.precision == precision
    assert plan.io_binding == (chain[0] != CPU)
    assert plan.reason


def test_tensorrt_keeps_fp16_engines_in_a_persistent_cache_with_one_profile():
    plan = choose_execution(
        available=GPU_BUILD,
        gpu_count=1,
        published=ALL,
        trt_cache_dir="/var/cache/t/m-1",
        max_batch_size=16,
        max_seq_len=64,
    )
    name, opts = plan.providers[0]
    assert name == TRT
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == "/var/cache/t/m-1"
    assert opts["trt_timing_cache_enable"] is True
    # Every shape the server sends lies inside the profile: no engine rebuild while serving.
    assert opts["trt_profile_min_shapes"].startswith("input_ids:1x1")
    assert "input_ids:16x64" in opts["trt_profile_max_shapes"]
    assert "attention_mask:16x64" in opts["trt_profile_max_shapes"]
    assert plan.providers[1] == (CUDA, {"device_id": 0})


def test_overrides_win():
    plan = choose_execution(available=GPU_BUILD, gpu_count=1, published=ALL, providers=[CUDA], variant="fp32")
    assert plan.provider_names == (CUDA, CPU) and plan.variant == "fp32"
    assert "configuration" in plan.reason
    plan = choose_execution(available=GPU_BUILD, gpu_count=1, published=ALL, providers=[CPU])
    assert plan.provider_names == (CPU,) and plan.variant == "int8" and not plan.io_binding


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(available=[CPU], gpu_count=0, published=ALL, providers=[CUDA]), "not available"),
        (dict(available=GPU_BUILD, gpu_count=0, published=ALL, providers=[TRT]), "need a GPU"),
        (
            dict(available=[CPU], gpu_count=0, published={"fp32": ALL["fp32"]}, variant="int8"),
            "not published",
        ),
        (dict(available=[CPU], gpu_count=0, published={}), "no published variant"),
    ],
)
def test_impossible_overrides_are_refused_not_replaced(kw, message):
    with pytest.raises(ProviderError, match=message):
        choose_execution(**kw)


def test_gpus_counted_from_device_nodes_when_the_proc_folder_is_hidden(tmp_path):
    from inference.providers import count_gpus

    dev = tmp_path / "dev"
    dev.mkdir()
    for n in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"):
        (dev / n).touch()
    assert count_gpus(proc_dir=str(tmp_path / "missing"), dev_dir=str(dev)) == 2
    proc = tmp_path / "gpus"
    proc.mkdir()
    (proc / "0000:00:1e.0").mkdir()
    assert count_gpus(proc_dir=str(proc), dev_dir=str(dev)) == 1
    assert count_gpus(proc_dir=str(tmp_path / "missing"), dev_dir=str(tmp_path / "nodev")) == 0


def test_tensorrt_listed_by_onnxruntime_but_not_installed_is_not_chosen(monkeypatch):
    """onnxruntime-gpu lists TensorRT even without libnvinfer; planning for it would run the
    fp32 graph on CUDA after ORT's silent fallback. This machine has no TensorRT."""
    import onnxruntime as ort

    from inference import providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    assert not providers.tensorrt_loadable()
    hw = providers.detect_hardware()
    assert hw.available_providers == (CUDA, CPU)
    plan = choose_execution(available=hw.available_providers, gpu_count=1, published=ALL)
    assert plan.provider_names[0] == CUDA and plan.variant == "fp16"
