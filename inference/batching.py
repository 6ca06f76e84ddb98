"""Dynamic batching: a pure "take the next batch" decision and the asyncio pipeline around it.

``take_batch`` chooses, from the queue of tokenized texts, the next batch: it always holds the
oldest text (nothing starves), then grows by the neighbour *in length order* that adds the least
padding, while the padded cost (longest sequence x count) stays within ``max_batch_tokens`` and
the count within ``max_batch_size``. Grouping by length is what keeps CPU batching worth it:
a 60-token text padded into a batch of 12-token texts multiplies that batch's cost by five.

``Batcher`` is the pipeline one server process runs:

    submit() ─► incoming ─► tokenize (thread) ─► ready ─► take_batch ─► hand-off ─► runner threads

Tokenization runs in a worker thread, in groups, off the event loop. ``run_workers`` runner
threads each take a padded batch from a thread-safe hand-off and run it; one more batch than
there are runners is formed and padded ahead, so a runner that finishes picks the next batch up
at once, without waiting for the event loop (busy with HTTP) to dispatch it. A batch is formed
only when a runner slot is free, so under load it collects everything that arrived during the
previous run. When a run fails, every request with a text in that batch gets the error. Each text remembers the model it was admitted under, so a hot swap lets
queued texts finish on the old model while new ones go to the new one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from inference.serve_errors import ServeError

log = logging.getLogger("nlpfleet.batching")


def take_batch(lengths: Sequence[int], *, max_batch_tokens: int, max_batch_size: int) -> list[int]:
    """Indices (into ``lengths``, oldest first) of the next batch, in queue order.

    Index 0 is always taken; a text longer than the budget still goes alone (the server's
    limits make sure it cannot be). The batch is maximal: no text left behind could join it
    without breaking a bound.

    >>> take_batch([10, 50, 11, 12, 49], max_batch_tokens=40, max_batch_size=8)
    [0, 2, 3]
    >>> take_batch([10, 50, 11, 12, 49], max_batch_tokens=1000, max_batch_size=2)
    [0, 2]
    >>> take_batch([], max_batch_tokens=10, max_batch_size=2)
    []
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    pos = order.index(0)
    lo = hi = pos
    longest = lengths[0]
    count = 1
    while count < max_batch_size:
        # Candidates: the next shorter and the next longer text in length order.
        best = None
        if lo > 0:
            i = order[lo - 1]
            if longest * (count + 1) <= max_batch_tokens:
                best = ("lo", longest - lengths[i])  # waste: this text's own padding
        if hi < n - 1:
            i = order[hi + 1]
            new_longest = max(longest, lengths[i])
            if new_longest * (count + 1) <= max_batch_tokens:
                waste = (new_longest - longest) * count + (new_longest - lengths[i])
                if best is None or waste < best[1]:
                    best = ("hi", waste)
        if best is None:
            break
        if best[0] == "lo":
            lo -= 1
        else:
            hi += 1
            longest = max(longest, lengths[order[hi]])
        count += 1
    return sorted(order[lo : hi + 1])


def wait_before_dispatch_ms(
    lengths: Sequence[int],
    oldest_age_ms: float,
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    max_wait_ms: float,
) -> float:
    """How long to keep collecting before dispatching: 0 when the next batch is already full
    (a bound is reached, or the queue holds more than one batch), else what is left of
    ``max_wait_ms`` since the oldest text arrived.

    >>> wait_before_dispatch_ms([5, 5], 0.5, max_batch_tokens=100, max_batch_size=2, max_wait_ms=2)
    0.0
    >>> wait_before_dispatch_ms([5], 0.5, max_batch_tokens=100, max_batch_size=2, max_wait_ms=2)
    1.5
    """
    if not lengths:
        return max_wait_ms
    batch = take_batch(lengths, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)
    if len(batch) >= max_batch_size or len(batch) < len(lengths):
        return 0.0
    return max(0.0, max_wait_ms - oldest_age_ms)


class Model(Protocol):
    """What the batcher needs from a loaded classifier (``inference.runtime.Classifier``)."""

    def encode(self, texts: list[str]) -> list[Any]: ...  # items with .ids and .truncated

    def pad(self, batch_ids: list[list[int]]) -> Any: ...  # the session's inputs for a batch

    def predict_padded(self, padded: Any, top_ks: list[int]) -> list[dict]: ...


class BatchMetrics(Protocol):
    def observe_batch(self, size: int, padded_tokens: int, run_s: float) -> None: ...


@dataclass(eq=False)
class _Request:
    model: Model
    texts: list[str]
    top_k: int
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


@dataclass(eq=False)
class _Item:
    request: _Request
    pos: int
    ids: list[int]
    truncated: bool
    arrival: float


@dataclass(eq=False)
class _Batch:
    model: Model
    items: list[_Item]
    padded_tokens: int
    inputs: Any = None  # padded arrays, built before the runner takes the batch


class Batcher:
    """The asyncio pipeline of one server process. ``await submit(model, texts, top_k)``
    returns one result dict per text, or raises ``ServeError``."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        token_overflow: str = "truncate",
        run_workers: int = 1,
        metrics: BatchMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_ms = max_wait_ms
        self.token_overflow = token_overflow
        self.metrics = metrics
        self.clock = clock
        self._incoming: list[_Request] = []
        self._ready: list[_Item] = []
        self._incoming_evt = asyncio.Event()
        self._ready_evt = asyncio.Event()
        self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        # Concurrent model runs, each in its own thread (ONNX Runtime releases the GIL while it
        # runs). On CPU, single-threaded runs side by side beat one run spread over the cores:
        # small batches spend much of a multi-threaded run synchronising its threads.
        self.run_workers = run_workers
        self._handoff: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._slots: asyncio.Semaphore | None = None  # batches formed and not finished
        self._runners: list[threading.Thread] = []
        self._tasks: list[asyncio.Task] = []
        self._queued_texts = 0

    @property
    def queue_depth(self) -> int:
        """Texts admitted and not yet handed to a model runner."""
        return self._queued_texts

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Each runner runs one batch; one more batch waits padded in the hand-off.
        self._slots = asyncio.Semaphore(self.run_workers + 1)
        self._runners = [
            threading.Thread(target=self._runner, args=(loop,), name=f"infer-{i}", daemon=True)
            for i in range(self.run_workers)
        ]
        for t in self._runners:
            t.start()
        self._tasks = [
            loop.create_task(self._tokenize_loop(), name="tokenize"),
            loop.create_task(self._batch_loop(), name="batch"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        err = ServeError("draining", "server stopped before this request ran")
        for r in self._incoming:
            r.fail(err)
        for it in self._ready:
            it.request.fail(err)
        while True:  # batches formed but not taken by a runner
            try:
                batch = self._handoff.get_nowait()
            except queue.Empty:
                break
            for it in batch.items if batch else ():
                it.request.fail(err)
        for _ in self._runners:
            self._handoff.put(None)
        self._tok_pool.shutdown(wait=False)

    async def submit(self, model: Model, texts: list[str], top_k: int = 1) -> list[dict]:
        fut = asyncio.get_running_loop().create_future()
        req = _Request(model=model, texts=texts, top_k=top_k, future=fut, results=[None] * len(texts))
        req.remaining = len(texts)
        self._incoming.append(req)
        self._add_queued(len(texts))
        self._incoming_evt.set()
        return await fut

    def _add_queued(self, n: int) -> None:
        self._queued_texts += n  # the metric reads queue_depth when scraped

    async def _tokenize_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._incoming_evt.wait()
            self._incoming_evt.clear()
            reqs, self._incoming = self._incoming, []
            # Tokenize everything that arrived meanwhile in one call per model: the Rust
            # tokenizer is fastest on a list, and the hop to the thread is paid once.
            by_model: dict[int, list[_Request]] = {}
            for r in reqs:
                by_model.setdefault(id(r.model), []).append(r)
            for group in by_model.values():
                texts = [t for r in group for t in r.texts]
                try:
                    encs = await loop.run_in_executor(self._tok_pool, group[0].model.encode, texts)
                except Exception as e:  # a tokenizer failure is the backend's, not the client's
                    log.exception("tokenization failed")
                    for r in group:
                        self._add_queued(-len(r.texts))
                        r.fail(ServeError("backend", f"tokenization failed: {type(e).__name__}"))
                    continue
                now = self.clock()
                k = 0
                for r in group:
                    mine = encs[k : k + len(r.texts)]
                    k += len(r.texts)
                    if self.token_overflow == "reject":
                        over = [i for i, e in enumerate(mine) if e.truncated]
                        if over:
                            self._add_queued(-len(r.texts))
                            r.fail(
                                ServeError("too_large", f"inputs {over[:10]} exceed the token limit per text")
                            )
                            continue
                    for i, e in enumerate(mine):
                        self._ready.append(_Item(r, i, e.ids, e.truncated, now))
            self._ready_evt.set()

    async def _batch_loop(self) -> None:
        assert self._slots is not None
        while True:
            # Form a batch only when a runner will take it soon: what arrives meanwhile joins it.
            await self._slots.acquire()
            batch = await self._next_batch()
            self._add_queued(-len(batch.items))
            self._handoff.put(batch)

    async def _next_batch(self) -> _Batch:
        while True:
            while not self._ready:
                self._ready_evt.clear()
                await self._ready_evt.wait()
            # Only texts admitted under the oldest text's model can share its batch.
            model = self._ready[0].request.model
            cands = [i for i, it in enumerate(self._ready) if it.request.model is model]
            lengths = [len(self._ready[i].ids) for i in cands]
            age_ms = (self.clock() - self._ready[0].arrival) * 1000.0
            wait_ms = wait_before_dispatch_ms(
                lengths,
                age_ms,
                max_batch_tokens=self.max_batch_tokens,
                max_batch_size=self.max_batch_size,
                max_wait_ms=self.max_wait_ms,
            )
            if wait_ms > 0:
                self._ready_evt.clear()
                try:
                    await asyncio.wait_for(self._ready_evt.wait(), wait_ms / 1000.0)
                    continue  # more arrived: decide again
                except TimeoutError:
                    pass
            chosen = take_batch(
                lengths, max_batch_tokens=self.max_batch_tokens, max_batch_size=self.max_batch_size
            )
            picked = {cands[j] for j in chosen}
            items = [self._ready[i] for i in sorted(picked)]
            self._ready = [it for i, it in enumerate(self._ready) if i not in picked]
            longest = max(len(it.ids) for it in items)
            batch = _Batch(model, items, longest * len(items))
            try:
                batch.inputs = model.pad([it.ids for it in items])
            except Exception:
                log.exception("padding a batch failed")  # left to the runner, which reports it
            return batch

    def _runner(self, loop: asyncio.AbstractEventLoop) -> None:
        """A runner thread: run batches from the hand-off, post each outcome to the event loop."""
        while True:
            batch = self._handoff.get()
            if batch is None:
                return
            results, error = None, None
            t0 = time.perf_counter()
            try:
                if batch.inputs is None:
                    raise RuntimeError("the batch could not be padded")
                top_ks = [it.request.top_k for it in batch.items]
                results = batch.model.predict_padded(batch.inputs, top_ks)
                if len(results) != len(batch.items):
                    raise RuntimeError(f"model returned {len(results)} results for {len(batch.items)} texts")
            except Exception as e:
                log.exception("batch of %d texts failed", len(batch.items))
                error = e
            run_s = time.perf_counter() - t0
            try:
                loop.call_soon_threadsafe(self._deliver, batch, results, error, run_s)
            except RuntimeError:  # the loop is closed: the server has stopped, nobody waits
                return

    def _deliver(
        self, batch: _Batch, results: list | None, error: BaseException | None, run_s: float
    ) -> None:
        """On the event loop: answer the requests of a finished batch, free its runner slot."""
        assert self._slots is not None
        self._slots.release()
        if error is not None or results is None:
            err = ServeError("backend", f"inference failed: {type(error).__name__}: {error}"[:300])
            failed = {id(it.request): it.request for it in batch.items}
            for r in failed.values():
                r.fail(err)
            # Their other texts may still be queued: drop them rather than run them for nothing.
            dropped = [it for it in self._ready if id(it.request) in failed]
            if dropped:
                self._ready = [it for it in self._ready if id(it.request) not in failed]
                self._add_queued(-len(dropped))
            return
        if self.metrics:
            self.metrics.observe_batch(len(batch.items), batch.padded_tokens, run_s)
        for it, res in zip(batch.items, results, strict=True):
            r = it.request
            if r.future.done():
                continue
            res["truncated"] = it.truncated
            r.results[it.pos] = res
            r.remaining -= 1
            if r.remaining == 0:
                r.future.set_result(r.results)
