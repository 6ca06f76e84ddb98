"""GPU shape buckets in ``Classifier.pad`` (a pure function of the batch; no GPU needed)."""

import numpy as np

from inference.runtime import Classifier


def classifier(gpu: bool, max_tokens: int = 128, max_batch_size: int = 32) -> Classifier:
    clf = object.__new__(Classifier)
    clf.io_binding = gpu
    clf.max_tokens = max_tokens
    clf.max_batch_size = max_batch_size
    clf.pad_id = 0
    clf.input_names = {"input_ids", "attention_mask"}
    return clf


def test_cpu_pads_to_the_exact_longest():
    feeds = classifier(gpu=False).pad([[101, 7, 102], [101, 5, 6, 8, 102]])
    assert feeds["input_ids"].shape == (2, 5)


def test_gpu_pads_to_a_bucket_and_drops_the_extra_rows():
    clf = classifier(gpu=True)
    batch = [[101] + [7] * k + [102] for k in (3, 15, 7)]  # longest 17 tokens, 3 rows
    feeds = clf.pad(batch)
    assert feeds["input_ids"].shape == (4, 32)
    mask = feeds["attention_mask"]
    assert mask[:3].sum(axis=1).tolist() == [5, 17, 9]
    assert mask[3].tolist() == [1] + [0] * 31  # the padding row attends to one token: no empty softmax
    clf.run = lambda f: f["input_ids"].astype(np.float32)[:, :2]
    assert clf.logits(batch).shape == (3, 2)


def test_buckets_stay_inside_the_sessions_limits():
    clf = classifier(gpu=True, max_tokens=120, max_batch_size=48)
    assert clf.padded_shape(33, 113) == (48, 120)  # not 64 rows, not 128 tokens
    assert clf.padded_shape(1, 1) == (1, 16)
    buckets = classifier(gpu=True).shape_buckets(32)
    assert len(buckets) == 6 * 8 and buckets[-1] == (32, 128)
