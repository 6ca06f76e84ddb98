"""Server settings, request validation and the error table: what a client is told, and when."""

import dataclasses
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.serve_errors import STATUS_BY_KIND, ServeError
from inference.serve_settings import Settings, SettingsError, cli_to_env
from inference.server import _arg_parser, is_loopback, parse_classify

S = Settings.from_env(
    {"NLPFLEET_MODEL": "/m", "NLPFLEET_MAX_TEXTS_PER_REQUEST": "3", "NLPFLEET_MAX_CHARS_PER_TEXT": "20"}
)


def test_settings_from_a_plain_mapping_with_units_in_names():
    s = Settings.from_env(
        {
            "NLPFLEET_MODEL": "s3://b/models/m/1/",
            "NLPFLEET_MAX_WAIT_MS": "0.5",
            "NLPFLEET_MAX_BATCH_TOKENS": "2048",
            "NLPFLEET_PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider",
            "UNRELATED": "x",
        }
    )
    assert (s.model, s.max_wait_ms, s.max_batch_tokens) == ("s3://b/models/m/1/", 0.5, 2048)
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1


@pytest.mark.parametrize(
    "env, key",
    [
        ({}, "NLPFLEET_MODEL"),
        ({"NLPFLEET_MODEL": "/m", "NLPFLEET_PORT": "eighty"}, "NLPFLEET_PORT"),
        ({"NLPFLEET_MODEL": "/m", "NLPFLEET_MAX_BATCH_SIZE": "0"}, "NLPFLEET_MAX_BATCH_SIZE"),
        ({"NLPFLEET_MODEL": "/m", "NLPFLEET_TOKEN_OVERFLOW": "drop"}, "NLPFLEET_TOKEN_OVERFLOW"),
        ({"NLPFLEET_MODEL": "/m", "NLPFLEET_VARIANT": "bf16"}, "NLPFLEET_VARIANT"),
        # One longest text must fit a batch alone, or it could never run.
        ({"NLPFLEET_MODEL": "/m", "NLPFLEET_MAX_BATCH_TOKENS": "64"}, "NLPFLEET_MAX_BATCH_TOKENS"),
    ],
)
def test_bad_settings_fail_fast_naming_the_key(env, key):
    with pytest.raises(SettingsError, match=key):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "env, on_gpu, cpus, expected",
    [
        ({}, False, 2, (2, 1)),  # CPU: one single-threaded run per core
        ({}, False, 16, (16, 1)),
        ({"NLPFLEET_RUN_WORKERS": "1"}, False, 2, (1, 2)),  # one run spread over the cores
        ({"NLPFLEET_INTRA_OP_THREADS": "4"}, False, 16, (4, 4)),
        ({"NLPFLEET_RUN_WORKERS": "3", "NLPFLEET_INTRA_OP_THREADS": "2"}, False, 2, (3, 2)),  # as told
        ({}, True, 8, (1, 0)),  # GPU: one run feeds the device; ONNX Runtime's own CPU threads
    ],
)
def test_runs_and_threads_fill_the_cores_unless_told(env, on_gpu, cpus, expected):
    s = Settings.from_env({"NLPFLEET_MODEL": "/m", **env})
    assert s.threads_for(on_gpu=on_gpu, cpus=cpus) == expected


def test_a_cpu_provider_override_on_a_gpu_machine_runs_like_cpu():
    from inference.providers import Hardware
    from inference.server import resolve_threads

    gpu = Hardware(available_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), gpu_count=1)
    assert resolve_threads(Settings.from_env({"NLPFLEET_MODEL": "/m"}), gpu).run_workers == 1
    cpu_only = Settings.from_env({"NLPFLEET_MODEL": "/m", "NLPFLEET_PROVIDERS": "CPUExecutionProvider"})
    assert resolve_threads(cpu_only, gpu).intra_op_threads == 1


def test_cli_flags_override_environment():
    args = vars(
        _arg_parser().parse_args(
            ["--model", "/cli", "--max-wait-ms", "7", "--providers", "CPUExecutionProvider"]
        )
    )
    s = Settings.from_env({"NLPFLEET_MODEL": "/env", "NLPFLEET_MAX_WAIT_MS": "1", **cli_to_env(args)})
    assert (s.model, s.max_wait_ms, s.providers) == ("/cli", 7.0, ("CPUExecutionProvider",))


@pytest.mark.parametrize(
    "body, status, kind",
    [
        (b"", 400, "empty"),
        (b"   ", 400, "empty"),
        (b"{not json", 400, "malformed"),
        (b"[1, 2]", 400, "malformed"),
        (b'{"inputs": []}', 400, "empty"),
        (b'{"inputs": ["ok", "  "]}', 400, "empty"),
        (b'{"inputs": ["a", "b", "c", "d"]}', 413, "too_large"),
        (json.dumps({"inputs": ["x" * 21]}).encode(), 413, "too_large"),
        (b'{"texts": ["a"]}', 422, "invalid"),
        (b'{"top_k": 1}', 422, "invalid"),
        (b'{"inputs": "one string"}', 422, "invalid"),
        (b'{"inputs": ["a", 3]}', 422, "invalid"),
        (b'{"inputs": ["a"], "top_k": 0}', 422, "invalid"),
        (b'{"inputs": ["a"], "top_k": 78}', 422, "invalid"),
        (b'{"inputs": ["a"], "top_k": true}', 422, "invalid"),
        (b'{"inputs": ["a"], "top_k": "2"}', 422, "invalid"),
    ],
)
def test_each_bad_request_gets_its_status_and_a_named_problem(body, status, kind):
    with pytest.raises(ServeError) as e:
        parse_classify(body, S, 77)
    assert (e.value.status, e.value.kind) == (status, kind)
    assert e.value.body()["error"]["message"]


json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=25),
    lambda c: (
        st.lists(c, max_size=5) | st.dictionaries(st.sampled_from(["inputs", "top_k", "x"]), c, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(json_st | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_bad_input_is_never_a_server_error(doc):
    body = doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else json.dumps(doc).encode()
    try:
        texts, k = parse_classify(body, S, 77)
    except ServeError as e:
        assert 400 <= e.status < 500
    else:
        assert 1 <= len(texts) <= 3 and all(isinstance(t, str) and t.strip() for t in texts) and 1 <= k <= 77


def test_error_table():
    assert STATUS_BY_KIND["empty"] == 400 and STATUS_BY_KIND["malformed"] == 400
    assert STATUS_BY_KIND["too_large"] == 413 and STATUS_BY_KIND["invalid"] == 422
    assert STATUS_BY_KIND["overloaded"] == 429 and STATUS_BY_KIND["backend"] == 500
    assert STATUS_BY_KIND["not_ready"] == 503 and STATUS_BY_KIND["draining"] == 503
    with pytest.raises(ValueError):
        ServeError("oops", "unknown kinds are a bug")


def test_only_loopback_may_swap():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.0.0.5")
    assert not is_loopback("10.0.0.8") and not is_loopback("") and not is_loopback("testclient")


def test_runners_are_pinned_one_per_core_only_for_single_threaded_cpu_runs():
    from inference.providers import Hardware
    from inference.server import resolve_threads, runner_cpus

    cpus = sorted(os.sched_getaffinity(0))
    cpu = Hardware(available_providers=("CPUExecutionProvider",), gpu_count=0)

    def pinned(env, hw=cpu):
        return runner_cpus(resolve_threads(Settings.from_env({"NLPFLEET_MODEL": "/m", **env}), hw), hw)

    on = {"NLPFLEET_PIN_RUNNERS": "1"}
    assert pinned({}) == []  # off by default
    assert pinned(on) == cpus  # the auto CPU setting: one 1-thread run per core, each on its own
    assert pinned({**on, "NLPFLEET_INTRA_OP_THREADS": "2"}) == []  # multi-threaded runs: the OS places them
    gpu = Hardware(available_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), gpu_count=1)
    assert pinned(on, gpu) == []
