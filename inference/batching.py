"""Dynamic batching: a pure "take the next batch" decision and the pipeline around it.

``take_batch`` chooses, from the queue of tokenized texts, the next batch: it always holds the
oldest text (nothing starves) and the companions that make the batch cheapest per real token,
where a run costs a fixed part (measured on the model) plus its padded tokens (longest sequence x
count, at most ``max_batch_tokens``; at most ``max_batch_size`` texts). Grouping by length is
what keeps CPU batching worth it: a 60-token text padded into a batch of 12-token texts
multiplies that batch's cost by five.

``Batcher`` is the pipeline one server process runs:

    submit() ─► incoming ─┐
                          └─ runner thread: tokenize what came in ─► ready ─► take_batch ─► pad ─► run
                                                                                     │
    event loop ◄──────────── results (one call per batch) ◄──────────────────────────┘

The event loop only appends a request to ``incoming`` and later sets its future: everything
else happens in the ``run_workers`` runner threads, off the event loop. A runner that is free
takes what has arrived, tokenizes it (the Rust tokenizer releases the GIL), and forms its next
batch *at that moment* from everything waiting, so under load a batch is chosen from the deepest
possible queue (better length grouping, less padding) and no thread hop sits between a runner
finishing and the next batch starting. When the runners are idle, the first text waits at most
``max_wait_ms`` for company. When a run fails, every request with a text in that batch gets the
error. Each text remembers the model it was admitted under, so a hot swap lets queued texts
finish on the old model while new ones go to the new one; a batch never mixes models.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from inference.serve_errors import ServeError

log = logging.getLogger("nlpfleet.batching")


# What a model run costs beyond its padded tokens, in tokens, when the model did not measure it
# (``Classifier.run_cost``): the int8 MiniLM on one thread of this 2-core Xeon costs about
# 1.1 ms + 88 us per padded token, i.e. 12.5 tokens' worth of fixed cost per run.
DEFAULT_RUN_OVERHEAD_TOKENS = 12.5


def take_batch(
    lengths: Sequence[int],
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    run_overhead_tokens: float = DEFAULT_RUN_OVERHEAD_TOKENS,
) -> list[int]:
    """Indices (into ``lengths``, oldest first) of the next batch, in queue order.

    The batch always holds the oldest text (index 0: nothing starves) and, among all the batches
    that hold it and keep within both bounds (padded cost = longest x count <= ``max_batch_tokens``,
    count <= ``max_batch_size``), it is the cheapest *per real token*: a run costs
    ``run_overhead_tokens`` (its fixed part, in tokens) plus its padded tokens, and pays for the
    tokens of the texts it carries. So a batch grows while a companion pays for itself: a run's
    fixed cost is worth sharing, padding a 12-token text to 60 is not. The texts left behind wait
    for company of their own length. The choice is exact (every longest length x every count,
    companions taken longest first, oldest first among equal lengths).

    >>> take_batch([10, 50, 11, 12, 49], max_batch_tokens=40, max_batch_size=8)
    [0, 2, 3]
    >>> take_batch([10, 50, 11, 12, 49], max_batch_tokens=1000, max_batch_size=2)
    [0, 2]
    >>> take_batch([40, 12, 13, 41, 12], max_batch_tokens=1000, max_batch_size=8)
    [0, 3]
    >>> take_batch([], max_batch_tokens=10, max_batch_size=2)
    []
    """
    n = len(lengths)
    if n == 0:
        return []
    l0 = lengths[0]
    # Companions, longest first; among equal lengths the oldest first.
    others = sorted(range(1, n), key=lambda i: (-lengths[i], i))
    olen = [lengths[i] for i in others]
    room = min(max_batch_size, n) - 1
    best_v, best = (run_overhead_tokens + l0) / l0, (0, 0)  # (start, companions)
    start = 0
    while start < len(olen):
        # A batch whose longest text is olen[start] (or the oldest, once shorter): its best
        # companions are the next texts in this order, as many as pay for themselves.
        longest = max(l0, olen[start])
        total, cnt, prev_v = l0, 1, None
        for k in range(start, min(len(olen), start + room)):
            cnt += 1
            if longest * cnt > max_batch_tokens:
                break
            total += olen[k]
            v = (run_overhead_tokens + longest * cnt) / total
            if prev_v is not None and v > prev_v:
                break  # cost per token is unimodal in the count (linear over concave)
            prev_v = v
            if v < best_v:
                best_v, best = v, (start, k - start + 1)
        if olen[start] <= l0:
            break  # every later start is dominated: same longest, shorter companions
        # Next distinct length (a start inside a run of equal lengths only loses).
        nxt = start + 1
        while nxt < len(olen) and olen[nxt] == olen[start]:
            nxt += 1
        start = nxt
    s, c = best
    return sorted([0, *others[s : s + c]])


def wait_before_dispatch_ms(
    lengths: Sequence[int],
    oldest_age_ms: float,
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    max_wait_ms: float,
    run_overhead_tokens: float = DEFAULT_RUN_OVERHEAD_TOKENS,
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
    batch = take_batch(
        lengths,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        run_overhead_tokens=run_overhead_tokens,
    )
    if len(batch) >= max_batch_size or len(batch) < len(lengths):
        return 0.0
    return max(0.0, max_wait_ms - oldest_age_ms)


class Model(Protocol):
    """What the batcher needs from a loaded classifier (``inference.runtime.Classifier``)."""

    def encode(self, texts: list[str]) -> list[Any]: ...  # items with .ids and .truncated

    def pad(self, batch_ids: list[list[int]]) -> Any: ...  # the session's inputs for a batch

    def predict_padded(self, padded: Any, top_ks: list[int]) -> list[dict]: ...


class BatchMetrics(Protocol):
    # run_s: wall time of the batch's model call (pad, run, scores); cpu_s: its runner thread's
    # CPU time, which leaves out the time the thread waited for a core or the GIL.
    def observe_batch(self, size: int, padded_tokens: int, run_s: float, cpu_s: float) -> None: ...


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


@dataclass(eq=False, slots=True)
class _Item:
    request: _Request
    pos: int
    ids: list[int]
    truncated: bool
    arrival: float


class Batcher:
    """The batching pipeline of one server process. ``await submit(model, texts, top_k)``
    returns one result dict per text, or raises ``ServeError``. ``start()`` and ``submit()``
    are called on the event loop; the runner threads do the rest."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        token_overflow: str = "truncate",
        run_workers: int = 1,
        pin_cpus: Sequence[int] = (),
        metrics: BatchMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_ms = max_wait_ms
        self.token_overflow = token_overflow
        self.metrics = metrics
        self.clock = clock
        # Concurrent model runs, each in its own thread (ONNX Runtime releases the GIL while it
        # runs). On CPU, single-threaded runs side by side beat one run spread over the cores:
        # small batches spend much of a multi-threaded run synchronising its threads.
        self.run_workers = run_workers
        # Runner i stays on CPU pin_cpus[i % len] (Linux; empty: wherever the OS puts it). With
        # one single-threaded run per core, a runner that keeps its core keeps its caches warm
        # between batches instead of being migrated each time the event loop wakes up.
        self.pin_cpus = tuple(pin_cpus)
        # Shared between the event loop and the runners; held only for list operations, never
        # while tokenizing or running a model.
        self._cond = threading.Condition(threading.Lock())
        self._incoming: list[_Request] = []  # admitted, not tokenized yet
        self._ready: list[_Item] = []  # tokenized, waiting for a batch, oldest first
        self._queued_texts = 0
        self._idle_runners = 0
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runners: list[threading.Thread] = []

    @property
    def queue_depth(self) -> int:
        """Texts admitted and not yet handed to a model runner."""
        return self._queued_texts

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._runners = [
            threading.Thread(target=self._runner, args=(i,), name=f"infer-{i}", daemon=True)
            for i in range(self.run_workers)
        ]
        for t in self._runners:
            t.start()

    async def stop(self) -> None:
        """Stop the runners; requests not yet in a running batch fail with ``draining``."""
        with self._cond:
            self._stopped = True
            reqs = list(self._incoming) + [it.request for it in self._ready]
            self._incoming, self._ready = [], []
            self._queued_texts = 0
            self._cond.notify_all()
        err = ServeError("draining", "server stopped before this request ran")
        for r in reqs:
            r.fail(err)

    async def submit(self, model: Model, texts: list[str], top_k: int = 1) -> list[dict]:
        assert self._loop is not None, "Batcher.start() first"
        fut = self._loop.create_future()
        req = _Request(model, texts, top_k, fut, [None] * len(texts), len(texts))
        with self._cond:
            if self._stopped:
                raise ServeError("draining", "server is stopping")
            self._incoming.append(req)
            self._queued_texts += len(texts)
            if self._idle_runners:
                self._cond.notify()
        return await fut

    # ---- runner threads ---------------------------------------------------------------------

    def _post(self, fn, *args) -> bool:
        """Run ``fn(*args)`` on the event loop; False once the loop is gone (server stopped)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
            return True
        except RuntimeError:
            return False

    def _runner(self, index: int = 0) -> None:
        """One runner thread: tokenize what arrived, form the next batch, run it, post results."""
        if self.pin_cpus and hasattr(os, "sched_setaffinity"):
            cpu = self.pin_cpus[index % len(self.pin_cpus)]
            try:
                os.sched_setaffinity(0, {cpu})  # 0: this thread
            except OSError as e:
                log.warning("runner %d not pinned to CPU %d: %s", index, cpu, e)
        while True:
            job = self._next_job()
            if job is None:
                return
            if isinstance(job, list):
                self._tokenize(job)
                continue
            model, items = job
            results, error, padded_tokens = None, None, 0
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                ids = [it.ids for it in items]
                padded_tokens = max(map(len, ids)) * len(ids)
                results = model.predict_padded(model.pad(ids), [it.request.top_k for it in items])
                if len(results) != len(items):
                    raise RuntimeError(f"model returned {len(results)} results for {len(items)} texts")
            except Exception as e:
                log.exception("batch of %d texts failed", len(items))
                error = e
            run_s, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
            if not self._post(self._deliver, items, results, error, padded_tokens, run_s, cpu_s):
                return

    def _next_job(self) -> list[_Request] | tuple[Model, list[_Item]] | None:
        """Under the lock: requests to tokenize, or the next batch (model, items), or None to
        stop. Waits while there is nothing to do, or while a lone not-full batch may still get
        company (at most ``max_wait_ms`` after its oldest text arrived)."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if self._incoming:
                    reqs, self._incoming = self._incoming, []
                    return reqs
                timeout = None
                if self._ready:
                    # Only texts admitted under the oldest text's model can share its batch.
                    model = self._ready[0].request.model
                    cands = [i for i, it in enumerate(self._ready) if it.request.model is model]
                    lengths = [len(self._ready[i].ids) for i in cands]
                    chosen = take_batch(
                        lengths,
                        max_batch_tokens=self.max_batch_tokens,
                        max_batch_size=self.max_batch_size,
                        # The model's own (measured at warm-up or configured), else the default.
                        run_overhead_tokens=getattr(
                            model, "run_overhead_tokens", DEFAULT_RUN_OVERHEAD_TOKENS
                        ),
                    )
                    age_ms = (self.clock() - self._ready[0].arrival) * 1000.0
                    full = len(chosen) >= self.max_batch_size or len(chosen) < len(lengths)
                    if full or age_ms >= self.max_wait_ms:
                        picked = {cands[j] for j in chosen}
                        items = [self._ready[i] for i in sorted(picked)]
                        self._ready = [it for i, it in enumerate(self._ready) if i not in picked]
                        self._queued_texts -= len(items)
                        if self._ready or self._incoming:
                            self._cond.notify()  # another idle runner can take the rest
                        return model, items
                    timeout = (self.max_wait_ms - age_ms) / 1000.0
                self._idle_runners += 1
                try:
                    self._cond.wait(timeout)
                finally:
                    self._idle_runners -= 1

    def _tokenize(self, reqs: list[_Request]) -> None:
        """Tokenize newly arrived requests (no lock held: other runners keep running) and queue
        their texts; requests that cannot be tokenized, or over the token limit under the
        ``reject`` policy, fail at once."""
        by_model: dict[int, list[_Request]] = {}
        for r in reqs:
            by_model.setdefault(id(r.model), []).append(r)
        items: list[_Item] = []
        failed: list[tuple[_Request, ServeError]] = []
        for group in by_model.values():
            texts = [t for r in group for t in r.texts]
            try:
                # The Rust tokenizer is fastest on a list, and releases the GIL while it works.
                encs = group[0].model.encode(texts)
            except Exception as e:  # a tokenizer failure is the backend's, not the client's
                log.exception("tokenization failed")
                err = ServeError("backend", f"tokenization failed: {type(e).__name__}")
                failed += [(r, err) for r in group]
                continue
            now = self.clock()
            k = 0
            for r in group:
                mine = encs[k : k + len(r.texts)]
                k += len(r.texts)
                if self.token_overflow == "reject":
                    over = [i for i, e in enumerate(mine) if e.truncated]
                    if over:
                        err = ServeError("too_large", f"inputs {over[:10]} exceed the token limit per text")
                        failed.append((r, err))
                        continue
                items += [_Item(r, i, e.ids, e.truncated, now) for i, e in enumerate(mine)]
        with self._cond:
            self._queued_texts -= sum(len(r.texts) for r, _ in failed)
            if self._stopped:  # stop() already failed what it found; these arrived too late
                failed += [(it.request, ServeError("draining", "server stopped before this request ran"))
                           for it in items]  # fmt: skip
                self._queued_texts = 0
            else:
                self._ready += items
        if failed:
            self._post(self._fail, failed)

    # ---- on the event loop ------------------------------------------------------------------

    @staticmethod
    def _fail(failed: list[tuple[_Request, ServeError]]) -> None:
        for r, err in failed:
            r.fail(err)

    def _deliver(
        self,
        items: list[_Item],
        results: list | None,
        error: BaseException | None,
        padded_tokens: int,
        run_s: float,
        cpu_s: float,
    ) -> None:
        """Answer the requests of a finished batch."""
        if error is not None or results is None:
            err = ServeError("backend", f"inference failed: {type(error).__name__}: {error}"[:300])
            failed = {id(it.request): it.request for it in items}
            for r in failed.values():
                r.fail(err)
            # Their other texts may still be queued: drop them rather than run them for nothing.
            with self._cond:
                keep = [it for it in self._ready if id(it.request) not in failed]
                self._queued_texts -= len(self._ready) - len(keep)
                self._ready = keep
            return
        if self.metrics:
            self.metrics.observe_batch(len(items), padded_tokens, run_s, cpu_s)
        for it, res in zip(items, results, strict=True):
            r = it.request
            if r.future.done():
                continue
            res["truncated"] = it.truncated
            r.results[it.pos] = res
            r.remaining -= 1
            if r.remaining == 0:
                r.future.set_result(r.results)
