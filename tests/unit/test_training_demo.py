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
