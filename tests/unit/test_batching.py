"""The batching core: which texts go together, and what every request gets back."""

import asyncio
import itertools
import os
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.batching import Batcher, take_batch, wait_before_dispatch_ms
from inference.serve_errors import ServeError

lengths_st = st.lists(st.integers(min_value=1, max_value=128), max_size=60)
budget_st = st.integers(min_value=128, max_value=4096)
size_st = st.integers(min_value=1, max_value=64)


def cost(lengths, batch):
    return max(lengths[i] for i in batch) * len(batch)


@settings(max_examples=300, deadline=None)
@given(lengths_st, budget_st, size_st, st.floats(min_value=0, max_value=1e9))
def test_batch_holds_the_oldest_and_respects_both_bounds(lengths, budget, size, overhead):
    batch = take_batch(lengths, max_batch_tokens=budget, max_batch_size=size, run_overhead_tokens=overhead)
    if not lengths:
        assert batch == []
        return
    assert batch[0] == 0, "the oldest text always goes: nothing starves"
    assert batch == sorted(set(batch)) and all(0 <= i < len(lengths) for i in batch)
    assert len(batch) <= size
    assert cost(lengths, batch) <= budget


def per_token(lengths, batch, overhead):
    return (overhead + cost(lengths, batch)) / sum(lengths[i] for i in batch)


overhead_st = st.floats(min_value=0, max_value=200)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=9),
    st.integers(min_value=64, max_value=400),
    st.integers(min_value=1, max_value=9),
    overhead_st,
)
def test_batch_is_the_cheapest_per_token_of_all_that_hold_the_oldest(lengths, budget, size, overhead):
    """Exhaustive over every subset of a small queue: no batch holding the oldest text, within
    both bounds, costs less per real token than the chosen one (a run = overhead + padded tokens)."""
    batch = take_batch(lengths, max_batch_tokens=budget, max_batch_size=size, run_overhead_tokens=overhead)
    best = per_token(lengths, batch, overhead)
    rest = range(1, len(lengths))
    for k in range(0, min(size, len(lengths))):
        for combo in itertools.combinations(rest, k):
            other = [0, *combo]
            if cost(lengths, other) <= budget:
                assert best <= per_token(lengths, other, overhead) + 1e-9, (other, batch)


@settings(max_examples=300, deadline=None)
@given(lengths_st, budget_st, size_st)
def test_with_a_dear_run_the_batch_is_maximal(lengths, budget, size):
    """When a run's fixed cost dwarfs its tokens (a GPU), no text left in the queue could have
    joined without breaking a bound."""
    batch = take_batch(lengths, max_batch_tokens=budget, max_batch_size=size, run_overhead_tokens=1e9)
    if len(batch) == size:
        return
    for i in set(range(len(lengths))) - set(batch):
        assert cost(lengths, [*batch, i]) > budget


def test_a_text_that_would_be_padded_far_waits_for_company_of_its_length():
    # The oldest is a 12-token question; a 60-token one would pad all of them to 60.
    assert take_batch([12, 60, 13, 11, 12], max_batch_tokens=1024, max_batch_size=8) == [0, 2, 3, 4]
    # Alone, the 60-token text goes on its own rather than make five short ones cost 60 each.
    assert take_batch([60, 12, 13, 11, 12], max_batch_tokens=1024, max_batch_size=8) == [0]
    # A run's fixed cost is worth sharing: a lone short text takes a slightly longer companion.
    assert take_batch([10, 12], max_batch_tokens=1024, max_batch_size=8) == [0, 1]


@settings(max_examples=200, deadline=None)
@given(lengths_st, budget_st, size_st, overhead_st)
def test_draining_a_queue_puts_every_text_in_exactly_one_batch(lengths, budget, size, overhead):
    queue = list(enumerate(lengths))  # (text id, length), oldest first
    seen = []
    while queue:
        batch = take_batch(
            [n for _, n in queue], max_batch_tokens=budget, max_batch_size=size, run_overhead_tokens=overhead
        )
        seen += [queue[i][0] for i in batch]
        queue = [q for i, q in enumerate(queue) if i not in set(batch)]
    assert sorted(seen) == list(range(len(lengths)))


def test_grouping_by_length_pads_far_less_than_arrival_order():
    # Banking77-like: mostly short questions, a few long ones, interleaved.
    lengths = [12, 60, 14, 11, 58, 13, 15, 62, 12, 14, 10, 61, 13, 12, 16, 59] * 4
    budget, size = 256, 16

    def padded_total(batches):
        return sum(cost(lengths, b) for b in batches)

    grouped, queue = [], list(range(len(lengths)))
    while queue:
        b = take_batch([lengths[i] for i in queue], max_batch_tokens=budget, max_batch_size=size)
        grouped.append([queue[i] for i in b])
        queue = [q for i, q in enumerate(queue) if i not in set(b)]
    fifo, cur = [], []
    for i in range(len(lengths)):  # arrival order, same bounds
        if cur and (max(lengths[j] for j in [*cur, i]) * (len(cur) + 1) > budget or len(cur) == size):
            fifo.append(cur)
            cur = []
        cur.append(i)
    fifo.append(cur)
    real = sum(lengths)
    assert padded_total(grouped) <= 1.25 * real
    assert padded_total(fifo) >= 2 * real


def test_wait_before_dispatch():
    kw = dict(max_batch_tokens=100, max_batch_size=4, max_wait_ms=5.0)
    assert wait_before_dispatch_ms([10], 1.0, **kw) == 4.0  # room left: keep collecting
    assert wait_before_dispatch_ms([10], 9.0, **kw) == 0.0  # oldest waited enough
    assert wait_before_dispatch_ms([10] * 4, 0.0, **kw) == 0.0  # full by count
    assert wait_before_dispatch_ms([60, 60], 0.0, **kw) == 0.0  # more than one batch queued


# ---- the asyncio pipeline, with an in-memory model ------------------------------------------


@dataclass
class Enc:
    ids: list
    truncated: bool


class WordModel:
    """Tokens = words (cut at 8); label = the text's first word. Records every batch."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    def encode(self, texts):
        return [Enc([hash(w) % 1000 for w in t.split()][:8], len(t.split()) > 8) for t in texts]

    def pad(self, batch_ids):
        return batch_ids

    def predict_padded(self, batch_ids, top_ks):
        self.batches.append([len(x) for x in batch_ids])
        labels = [self._label(x) for x in batch_ids]
        if self.fail_on is not None and self.fail_on in labels:
            raise RuntimeError("device lost")
        return [
            {"label": lab, "score": 1.0, "top_k": [{"label": lab, "score": 1.0}] * k}
            for lab, k in zip(labels, top_ks, strict=True)
        ]

    def _label(self, ids):
        return str(ids[0])


def run(coro):
    return asyncio.run(coro)


def test_every_request_gets_its_own_results_in_order():
    async def main():
        m = WordModel()
        b = Batcher(max_batch_size=4, max_batch_tokens=64, max_wait_ms=1.0)
        b.start()
        texts = [[f"w{i} a b", f"x{i}"] for i in range(10)]
        outs = await asyncio.gather(*(b.submit(m, t, top_k=2) for t in texts))
        await b.stop()
        return m, texts, outs, b

    m, texts, outs, b = run(main())
    for t, o in zip(texts, outs, strict=True):
        assert [r["label"] for r in o] == [str(hash(s.split()[0]) % 1000) for s in t]
        assert all(len(r["top_k"]) == 2 and r["truncated"] is False for r in o)
    assert all(len(x) <= 4 for x in m.batches)
    assert sum(map(len, m.batches)) == 20
    assert b.queue_depth == 0


def test_a_failed_batch_fails_every_request_in_it_and_only_those():
    async def main():
        m = WordModel(fail_on=str(hash("boom") % 1000))
        # Size-1 batches: the failing text's batch holds nobody else.
        b = Batcher(max_batch_size=1, max_batch_tokens=64, max_wait_ms=0)
        b.start()
        res = await asyncio.gather(
            b.submit(m, ["fine one"]), b.submit(m, ["boom now", "fine too"]), b.submit(m, ["fine three"]),
            return_exceptions=True,
        )  # fmt: skip
        # The pipeline keeps working after a failure.
        after = await b.submit(m, ["still fine"])
        await b.stop()
        return res, after, b

    res, after, b = run(main())
    assert isinstance(res[1], ServeError) and res[1].kind == "backend" and res[1].status == 500
    assert "device lost" in res[1].message
    assert res[0][0]["label"] and res[2][0]["label"]
    assert after[0]["label"]
    assert b.queue_depth == 0


def test_batch_failure_reaches_all_requests_sharing_the_batch():
    async def main():
        m = WordModel(fail_on=str(hash("boom") % 1000))
        b = Batcher(max_batch_size=8, max_batch_tokens=512, max_wait_ms=50)
        b.start()
        res = await asyncio.gather(
            *(b.submit(m, [t]) for t in ["a x", "boom", "c y"]), return_exceptions=True
        )
        await b.stop()
        return res, m

    res, m = run(main())
    assert m.batches == [[2, 1, 2]], "the three requests shared one batch"
    assert all(isinstance(r, ServeError) and r.kind == "backend" for r in res)


def test_reject_policy_refuses_texts_over_the_token_limit():
    async def main():
        m = WordModel()
        b = Batcher(max_batch_size=8, max_batch_tokens=512, max_wait_ms=0, token_overflow="reject")
        b.start()
        long = " ".join(["w"] * 20)
        with pytest.raises(ServeError) as e:
            await b.submit(m, ["short", long])
        ok = await b.submit(m, ["short"])
        await b.stop()
        return e.value, ok, b

    err, ok, b = run(main())
    assert err.kind == "too_large" and "[1]" in err.message
    assert ok[0]["truncated"] is False
    assert b.queue_depth == 0


def test_truncate_policy_flags_truncated_texts():
    async def main():
        b = Batcher(max_batch_size=8, max_batch_tokens=512, max_wait_ms=0)
        b.start()
        out = await b.submit(WordModel(), ["short", " ".join(["w"] * 20)])
        await b.stop()
        return out

    out = run(main())
    assert [r["truncated"] for r in out] == [False, True]


def test_texts_admitted_under_different_models_never_share_a_batch():
    async def main():
        old, new = WordModel(), WordModel()
        b = Batcher(max_batch_size=16, max_batch_tokens=512, max_wait_ms=20)
        b.start()
        await asyncio.gather(*(b.submit(old if i % 2 else new, [f"t{i}"]) for i in range(10)))
        await b.stop()
        return old, new

    old, new = run(main())
    assert sum(map(len, old.batches)) == 5 and sum(map(len, new.batches)) == 5


def test_runner_threads_run_on_the_cpus_they_are_pinned_to():
    before = os.sched_getaffinity(0)
    cpu = sorted(before)[-1]

    class Where(WordModel):
        def predict_padded(self, batch_ids, top_ks):
            self.cpus = os.sched_getaffinity(0)
            return super().predict_padded(batch_ids, top_ks)

    async def main():
        m = Where()
        b = Batcher(max_batch_size=4, max_batch_tokens=64, max_wait_ms=0, pin_cpus=[cpu])
        b.start()
        await b.submit(m, ["hello there"])
        await b.stop()
        return m

    assert run(main()).cpus == {cpu}
    assert os.sched_getaffinity(0) == before  # only the runner threads are pinned
