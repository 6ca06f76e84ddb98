"""Bad training data fails early with the file, the line and the problem; good data of every
accepted local shape (CSV, JSONL, shard folders) loads the same examples."""

import json

import pytest

from training.data import DataError, check_dev_labels, dataset_sha256, label_set, load_split


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_csv_with_crlf_quotes_and_custom_columns(tmp_path, data_dir):
    f = write(tmp_path / "t.csv", 'query,intent\r\n"hi, there",greet\r\nbye,leave\r\n"say ""x""",greet\r\n')
    s = load_split(f, "query", "intent")
    assert s.texts == ("hi, there", "bye", 'say "x"')
    assert s.labels == ("greet", "leave", "greet")
    assert label_set(s) == ["greet", "leave"]
    real = load_split(data_dir / "banking77" / "dev.csv", "text", "category")
    assert len(real) == 965 and len(label_set(real)) == 77


def test_jsonl_and_shard_folder_agree(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "input_ids": [101, 7 + i, 102]} for i in range(6)]
    write(tmp_path / "all.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    shards = tmp_path / "shards"
    shards.mkdir()
    write(shards / "part-00001.jsonl", "".join(json.dumps(r) + "\n" for r in rows[3:]))
    write(shards / "part-00000.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:3]))
    write(shards / "_index.json", "{}")  # not a shard: ignored
    one, many = load_split(tmp_path / "all.jsonl"), load_split(shards)
    assert one.texts == many.texts and one.labels == many.labels
    assert many.input_ids == tuple(tuple(r["input_ids"]) for r in rows)
    assert one.sha256 != many.sha256 and len(dataset_sha256(one, many)) == 64


@pytest.mark.parametrize(
    "name, content, cols, line, problem",
    [
        ("empty.csv", "", ("text", "label"), None, "empty file"),
        ("blank.jsonl", "\n\n", ("text", "label"), None, "empty file"),
        ("header.csv", "text,label\r\n", ("text", "label"), None, "no examples"),
        ("nocol.csv", "text,category\na,b\n", ("text", "label"), 1, "missing column 'label'"),
        ("bytes.csv", b"text,label\nok,a\ncaf\xe9,b\n", ("text", "label"), 3, "not UTF-8"),
        ("short.csv", "text,label\na,b\nonly-one-field\n", ("text", "label"), 3, "1 fields"),
        ("nolabel.csv", "text,label\na,b\nc,\n", ("text", "label"), 3, "missing label"),
        (
            "notext.jsonl",
            '{"text": "a", "label": 1}\n{"text": " ", "label": 2}\n',
            ("text", "label"),
            2,
            "empty",
        ),
        ("badjson.jsonl", '{"text": "a", "label": 1}\n{"text": \n', ("text", "label"), 2, "invalid JSON"),
        ("nofield.jsonl", '{"text": "a"}\n', ("text", "label"), 1, "missing field 'label'"),
        (
            "ids.jsonl",
            '{"text": "a", "label": 1, "input_ids": "101 102"}\n',
            ("text", "label"),
            1,
            "input_ids",
        ),
        ("data.parquet", "x", ("text", "label"), None, "unknown format"),
    ],
)
def test_bad_file_names_file_line_and_problem(tmp_path, name, content, cols, line, problem):
    f = write(tmp_path / name, content)
    with pytest.raises(DataError) as e:
        load_split(f, *cols)
    assert e.value.path == str(f)
    assert e.value.line == line
    assert problem in e.value.problem
    assert str(e.value).startswith(f"{f}:{line}:" if line else f"{f}:")


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_split(tmp_path / "nope.csv")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no .jsonl shards"):
        load_split(tmp_path / "dir")


def test_one_class_and_unseen_dev_labels(tmp_path):
    one = load_split(write(tmp_path / "one.csv", "text,label\na,x\nb,x\n"))
    with pytest.raises(DataError, match="single class"):
        label_set(one)
    train = load_split(write(tmp_path / "train.csv", "text,label\na,x\nb,y\n"))
    dev = load_split(write(tmp_path / "dev.csv", "text,label\na,x\nb,y\nc,z\n"))
    with pytest.raises(DataError) as e:
        check_dev_labels(dev, label_set(train))
    assert (e.value.path, e.value.line) == (str(tmp_path / "dev.csv"), 4)
    assert "'z' does not occur in the training data" in str(e.value)
