"""The planner: the brief's tiers as a table, the choices a practitioner expects, and
Hypothesis invariants (the choice fits memory; a later deadline never costs more)."""

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.catalog import CATALOG
from chalicelib.jobs import BASE_MODELS
from chalicelib.planner import GPU_USABLE, Workload, plan


def model(name, **kw):
    p, layers, hidden, heads = BASE_MODELS[name]
    return dict(params=p, layers=layers, hidden=hidden, heads=heads, **kw)


def light(c):
    return c.instance.gpu is None and 4 <= c.instance.vcpus <= 8 and c.instance.memory_gb <= 16


def moderate(c):
    i = c.instance
    return i.gpu_count == 1 or (16 <= i.vcpus <= 32 and i.memory_gb >= 64)


def heavy(c):
    return c.instance.gpu_count > 1 and c.instance.memory_gb >= 128 and c.strategy == "ddp"


TIERS = [
    # (description, workload, tier predicate)
    (
        "text classification of 10k support tickets, MiniLM",
        Workload(kind="infer", corpus_bytes=1_000_000, **model("all-MiniLM-L6-v2")),
        light,
    ),
    (
        "NER inference on 5k sentences, DistilBERT",
        Workload(kind="infer", corpus_bytes=500_000, **model("distilbert-base-uncased")),
        light,
    ),
    (
        "fine-tune BERT-base, 100k examples x 3 epochs",
        Workload(kind="train", examples=100_000, epochs=3, **model("bert-base-uncased")),
        moderate,
    ),
    (
        "fine-tune BERT-large, 50k examples, 2 h deadline",
        Workload(
            kind="train", examples=50_000, epochs=2, seq_len=256, deadline_h=2, **model("bert-large-uncased")
        ),
        moderate,
    ),
    (
        "train GPT-2 XL (1.5B) on 2B tokens within 3 days",
        Workload(kind="train", examples=2_000_000, seq_len=1024, epochs=1, deadline_h=72, **model("gpt2-xl")),
        heavy,
    ),
    (
        "train a 1.3B GPT-Neo on 500M tokens within a day",
        Workload(
            kind="train", examples=500_000, seq_len=1024, epochs=1, deadline_h=24, **model("gpt-neo-1.3B")
        ),
        heavy,
    ),
]


@pytest.mark.parametrize("desc,w,tier", TIERS, ids=[t[0] for t in TIERS])
def test_brief_tiers(desc, w, tier):
    p = plan(w)
    assert p.choice is not None, dict(p.rejected)
    assert tier(p.choice), (desc, p.choice.instance.name, p.choice.strategy)


def test_ddp_only_when_one_gpu_cannot_fit_or_finish_in_time():
    w = Workload(kind="train", examples=100_000, epochs=3, **model("bert-base-uncased"))
    assert plan(w).choice.strategy == "single-gpu"
    fast = plan(replace(w, examples=3_000_000, deadline_h=2))
    assert fast.choice.strategy == "ddp" and fast.choice.instance.gpu_count > 1
    assert any("deadline" in why for name, why in fast.rejected if name == "g4dn.xlarge")


def test_gradient_accumulation_when_the_batch_does_not_fit():
    w = Workload(
        kind="train", examples=1_000_000, seq_len=1024, batch_size=64, deadline_h=72, **model("gpt2-xl")
    )
    c = plan(w).choice
    assert c.micro_batch * c.grad_accum * c.procs >= 64 and c.micro_batch < 64 // c.procs
    assert c.gpu_memory_need_gb <= c.instance.gpu.memory_gb * GPU_USABLE


def test_a_model_too_large_for_any_gpu_says_so():
    p = plan(Workload(kind="train", examples=10_000_000, deadline_h=48, **model("llama-2-7b")))
    assert p.choice is None
    assert "model states" in dict(p.rejected)["p4d.24xlarge"]


def test_bf16_needs_an_ampere_gpu():
    p = plan(Workload(kind="train", examples=100_000, precision="bf16", **model("bert-base-uncased")))
    assert p.choice.instance.gpu.bf16 and "no bf16" in dict(p.rejected)["g4dn.xlarge"]


def test_preprocessing_stays_on_cpu_and_picks_memory_or_storage_when_needed():
    small = plan(Workload(kind="preprocess", corpus_bytes=2 * 10**9))
    assert small.choice.instance.gpu is None and small.choice.instance.category in ("compute", "general")
    assert all(c.instance.gpu is None for c in small.candidates)
    in_mem = plan(Workload(kind="preprocess", corpus_bytes=100 * 10**9, in_memory=True))
    assert in_mem.choice.instance.category == "memory" and in_mem.choice.instance.memory_gb >= 202
    crawl = plan(Workload(kind="preprocess", corpus_bytes=2 * 10**12))
    assert crawl.choice.instance.category == "storage" and crawl.choice.instance.local_storage_gb >= 6000


def test_hourly_limit_and_candidates_are_ordered_by_cost():
    w = Workload(kind="train", examples=100_000, epochs=3, max_hourly_usd=0.5, **model("bert-base-uncased"))
    p = plan(w)
    assert all(c.instance.hourly_usd <= 0.5 for c in p.candidates)
    costs = [round(c.cost_usd, 6) for c in p.candidates]
    assert costs == sorted(costs)


def test_catalog_covers_the_brief_families():
    families = {t.family for t in CATALOG}
    assert {
        "c5",
        "c6i",
        "m5",
        "m6i",
        "r5",
        "r6i",
        "x2idn",
        "g4dn",
        "g5",
        "p3",
        "p4d",
        "i3",
        "d2",
        "h1",
    } <= families
    assert len(CATALOG) >= 20 and len({t.name for t in CATALOG}) == len(CATALOG)


workloads = st.builds(
    Workload,
    kind=st.sampled_from(["train", "infer", "preprocess"]),
    params=st.integers(1_000_000, 3_000_000_000),
    seq_len=st.sampled_from([64, 128, 256, 512, 1024]),
    batch_size=st.integers(1, 256),
    epochs=st.integers(1, 5),
    examples=st.integers(1, 5_000_000),
    precision=st.sampled_from(["fp32", "fp16", "bf16"]),
    corpus_bytes=st.integers(1, 5 * 10**12),
    in_memory=st.booleans(),
    max_hourly_usd=st.one_of(st.none(), st.floats(0.1, 40)),
)


@settings(max_examples=150, deadline=None)
@given(workloads)
def test_the_choice_always_fits_memory(w):
    p = plan(w)
    for c in p.candidates[:3]:
        assert c.memory_need_gb <= c.instance.memory_gb
        if c.instance.gpu is not None:
            assert c.gpu_memory_need_gb <= c.instance.gpu.memory_gb * GPU_USABLE
        if w.max_hourly_usd is not None:
            assert c.instance.hourly_usd <= w.max_hourly_usd


@settings(max_examples=150, deadline=None)
@given(workloads, st.floats(0.05, 200), st.floats(0, 500))
def test_a_later_deadline_never_costs_more(w, deadline, extra):
    tight = plan(replace(w, deadline_h=deadline))
    loose = plan(replace(w, deadline_h=deadline + extra))
    if tight.choice is not None:
        assert loose.choice is not None
        assert loose.choice.cost_usd <= tight.choice.cost_usd + 1e-9
