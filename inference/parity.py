"""The parity gate: which exported variants may be published.

Each ONNX variant's logits on held-out texts are compared with the PyTorch model's (the
reference). The rules (``ParityThresholds``):

- ``fp32``: max |logit difference| vs PyTorch at most ``fp32_max_abs_diff`` (1e-3): the export
  must be numerically the same model.
- ``int8`` / ``fp16``: top-1 agreement with PyTorch at least ``min_top1_agreement`` (99 %) and
  accuracy on the held-out labels at most ``max_accuracy_drop_pts`` (1.0 point) below the
  reference: lossy variants may move logits, not decisions.

``measure`` turns logits into numbers (numpy, no I/O); ``judge`` turns numbers into a verdict
with reasons (pure, stdlib). The export pipeline records both in the manifest's ``parity``.

Example::

    >>> t = ParityThresholds()
    >>> judge("int8", {"max_abs_diff": 0.2, "top1_agreement": 0.98, "accuracy": 0.80,
    ...                "reference_accuracy": 0.80, "n": 100}, t)
    (False, ['top-1 agreement 98.00% < 99.00%'])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ParityThresholds:
    fp32_max_abs_diff: float = 1e-3
    min_top1_agreement: float = 0.99
    max_accuracy_drop_pts: float = 1.0
    # Fewer held-out texts than this make a 99 % agreement meaningless (1 flip = >1 %).
    min_heldout: int = 20

    def to_dict(self) -> dict:
        return asdict(self)


def measure(reference_logits, candidate_logits, labels) -> dict:
    """Compare a candidate's logits with the reference's on the same texts.

    ``labels`` are the gold class ids. Returns plain floats (JSON-ready)."""
    import numpy as np

    ref = np.asarray(reference_logits, dtype=np.float64)
    cand = np.asarray(candidate_logits, dtype=np.float64)
    gold = np.asarray(labels)
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
    ref_top = ref.argmax(axis=1)
    cand_top = cand.argmax(axis=1)
    return {
        "n": int(ref.shape[0]),
        "max_abs_diff": float(np.max(np.abs(ref - cand))) if ref.size else 0.0,
        "top1_agreement": float(np.mean(ref_top == cand_top)) if ref.size else 0.0,
        "accuracy": float(np.mean(cand_top == gold)) if ref.size else 0.0,
        "reference_accuracy": float(np.mean(ref_top == gold)) if ref.size else 0.0,
        "macro_f1": _macro_f1(gold, cand_top),
        "reference_macro_f1": _macro_f1(gold, ref_top),
    }


def _macro_f1(gold, pred) -> float:
    """Unweighted mean F1 over the classes present in gold or predictions."""
    import numpy as np

    classes = np.union1d(gold, pred)
    if not classes.size:
        return 0.0
    f1 = []
    for c in classes:
        tp = np.sum((gold == c) & (pred == c))
        denom = np.sum(gold == c) + np.sum(pred == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def judge(variant: str, m: dict, t: ParityThresholds) -> tuple[bool, list[str]]:
    """Decide whether ``variant`` with measurements ``m`` may be published; the reasons say
    why not (empty when it passes).

    >>> judge("fp32", {"max_abs_diff": 2e-4, "top1_agreement": 1.0, "accuracy": 0.9,
    ...                "reference_accuracy": 0.9, "n": 50}, ParityThresholds())
    (True, [])
    """
    reasons: list[str] = []
    if m["n"] < t.min_heldout:
        reasons.append(f"only {m['n']} held-out texts (< {t.min_heldout}): parity not measurable")
    if variant == "fp32":
        if not m["max_abs_diff"] <= t.fp32_max_abs_diff:
            reasons.append(f"max |logit diff| {m['max_abs_diff']:.2e} > {t.fp32_max_abs_diff:.0e}")
    else:
        if not m["top1_agreement"] >= t.min_top1_agreement:
            reasons.append(f"top-1 agreement {m['top1_agreement']:.2%} < {t.min_top1_agreement:.2%}")
        drop_pts = (m["reference_accuracy"] - m["accuracy"]) * 100
        if not drop_pts <= t.max_accuracy_drop_pts:
            reasons.append(f"accuracy {drop_pts:.2f} points below fp32 (> {t.max_accuracy_drop_pts} allowed)")
    return (not reasons, reasons)
