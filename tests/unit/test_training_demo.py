"""``make demo`` finds the shared data or says exactly what to do."""

import pytest

from nlpfleet.demo import DemoError, main, shared_data_dir


def test_missing_data_names_the_path_and_the_fix(tmp_path, capsys, monkeypatch):
    with pytest.raises(DemoError) as e:
        shared_data_dir({"NLPFLEET_SHARED": str(tmp_path)})
    assert str(tmp_path / "data" / "banking77") in str(e.value)
    assert "NLPFLEET_SHARED" in str(e.value)
    monkeypatch.setenv("NLPFLEET_SHARED", str(tmp_path))
    assert main(["--work", str(tmp_path / "w")]) == 2
    assert "banking77 not found" in capsys.readouterr().err


def test_finds_the_shared_folder(data_dir):
    assert shared_data_dir({"NLPFLEET_SHARED": str(data_dir.parent)}) == data_dir / "banking77"


def test_table_shows_every_variant_with_its_gate_verdict():
    from nlpfleet.demo import format_table, table_rows

    p = {"accuracy": 0.8, "macro_f1": 0.75, "reference_accuracy": 0.81, "reference_macro_f1": 0.76}
    manifest = {
        "parity": {
            "thresholds": {"min_top1_agreement": 0.99},
            "fp32": {**p, "passed": True, "reasons": []},
            "int8": {**p, "accuracy": 0.7, "passed": False, "reasons": ["top-1 agreement 93.00% < 99.00%"]},
        }
    }
    sizes = {"pytorch-fp32": 91_000_000, "onnx-fp32": 91_100_000, "onnx-int8": 58_900_000}
    rows = table_rows(manifest, {"pytorch-fp32": 20.0, "onnx-fp32": 10.0, "onnx-int8": 5.0}, sizes)
    assert [(r["name"], r["accuracy"]) for r in rows] == [
        ("pytorch-fp32", 0.81),
        ("onnx-fp32", 0.8),
        ("onnx-int8", 0.7),
    ]
    text = format_table(rows)
    assert "held back: top-1 agreement 93.00% < 99.00%" in text
    assert "   70.00" in text and "58.9" in text
