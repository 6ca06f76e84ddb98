"""The pure parts of the training worker: batching, metrics, checkpoint timing, config."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from training.checkpoint import should_checkpoint
from training.config import ConfigError, TrainConfig
from training.worker import length_grouped_batches, macro_f1, rank_batches, steps_per_epoch


@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=300),
    batch=st.integers(1, 40),
    seed=st.integers(0, 10),
    epoch=st.integers(0, 5),
)
def test_every_example_lands_in_exactly_one_batch(lengths, batch, seed, epoch):
    b = length_grouped_batches(lengths, batch, seed, epoch)
    assert sorted(i for x in b for i in x) == list(range(len(lengths)))
    assert all(1 <= len(x) <= batch for x in b)
    assert b == length_grouped_batches(lengths, batch, seed, epoch)  # resumable: pure


def test_length_grouping_pads_less_than_random_batches():
    import random

    rnd = random.Random(0)
    lengths = [rnd.randint(5, 64) for _ in range(2000)]
    grouped = length_grouped_batches(lengths, 32, seed=1, epoch=0)
    shuffled = list(range(2000))
    rnd.shuffle(shuffled)
    plain = [shuffled[i : i + 32] for i in range(0, 2000, 32)]

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    assert padded(grouped) < 0.75 * padded(plain)
    assert length_grouped_batches(lengths, 32, 1, 0) != length_grouped_batches(lengths, 32, 1, 1)


@given(n=st.integers(0, 50), world=st.integers(1, 8))
def test_ranks_get_equal_disjoint_shares(n, world):
    batches = [[i] for i in range(n)]
    shares = [rank_batches(batches, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    flat = [b[0] for s in shares for b in s]
    assert len(flat) == len(set(flat)) and len(flat) >= n - world + 1


def test_steps_and_metrics():
    assert steps_per_epoch(10, 3) == 4
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0
    assert macro_f1([0, 0, 0, 0], [1, 1, 1, 1]) == 0.0
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 0.8) / 2)


def test_checkpoint_timing():
    assert [
        s for s in range(1, 31) if should_checkpoint(s, 10, end_of_epoch=False, stop_requested=False)
    ] == [
        10,
        20,
        30,
    ]
    assert should_checkpoint(7, 0, end_of_epoch=True, stop_requested=False)
    assert not should_checkpoint(7, 0, end_of_epoch=False, stop_requested=False)


def test_config_fails_fast_naming_the_key():
    with pytest.raises(ConfigError, match="'lr'"):
        TrainConfig(train="t.csv", output_dir="o", lr=5)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"train": "t.csv", "output_dir": "o", "learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="checkpoint_s3_uri"):
        TrainConfig(train="t.csv", output_dir="o", checkpoint_s3_uri="/tmp/x")
    c = TrainConfig.from_dict({"train": "t.csv", "output_dir": "o/"})
    assert c.checkpoint_path == "o/checkpoints"


def test_cli_flags_round_trip_the_config():
    import argparse

    p = argparse.ArgumentParser()
    TrainConfig.add_arguments(p)
    ns = p.parse_args(
        ["--train", "t.csv", "--output-dir", "o", "--lr", "2e-4", "--max-steps", "5", "--no-resume"]
    )
    c = TrainConfig.from_args(ns)
    assert (c.lr, c.max_steps, c.resume, c.epochs) == (2e-4, 5, False, 3)
