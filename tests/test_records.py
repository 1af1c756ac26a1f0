"""Records: JSONL round trip, line-level validation errors, atomic writes, ShareGPT export."""

from __future__ import annotations

import json

import pytest

from minicd import DataError
from minicd.data.records import (Record, iter_records, read_records, sharegpt_dataset_info,
                                 update_dataset_info, write_records, write_sharegpt)
from minicd.prompts import coding_prompt

SECRET = "pt john doe seen at [**hospital**] for chf."        # must never reach an error message


def rec(i: int, split: str = "train", system: str = "icd9", codes=("401.9", "38.93")) -> Record:
    return Record(id=str(100 + i), subject_id=str(i // 2), split=split,
                  note=f"{SECRET}\nline two, é ü {i}", codes=tuple(codes), code_system=system)


def good_line(**over) -> str:
    obj = {"id": "1", "subject_id": "2", "split": "train", "note": SECRET,
           "codes": ["401.9"], "code_system": "icd9"}
    obj.update(over)
    for k, v in list(obj.items()):
        if v is KeyError:
            del obj[k]
    return json.dumps(obj)


def test_round_trip(tmp_path):
    recs = [rec(0), rec(1, "val", "icd10", ("E11.9", "I10", "02HV33Z")), rec(2, "test")]
    path = tmp_path / "sub" / "train.jsonl"
    assert write_records(recs, path) == 3
    assert read_records(path) == recs
    assert list(iter_records(path)) == recs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[1]) == {"id": "101", "subject_id": "0", "split": "val",
                                    "note": rec(1).note, "codes": ["E11.9", "I10", "02HV33Z"],
                                    "code_system": "icd10"}
    assert "é ü" in lines[0]                     # UTF-8 kept, not \u-escaped
    # Byte-identical on rewrite; no temporary files left behind.
    before = path.read_bytes()
    write_records(recs, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]


def test_read_normalizes_and_dedupes_codes(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(good_line(codes=[" i10. ", "E11.9", "I10"], code_system="icd10") + "\n\n")
    (r,) = read_records(path)
    assert r.codes == ("I10", "E11.9")


@pytest.mark.parametrize("line, key, needle", [
    ('{"id": "1", "note": ', None, "malformed JSON"),
    ('["not", "an", "object"]', None, "JSON object"),
    (good_line(note=KeyError), "note", "missing"),
    (good_line(codes=KeyError), "codes", "missing"),
    (good_line(id=7), "id", "string"),
    (good_line(note=""), "note", "empty"),
    (good_line(note="  \n "), "note", "empty"),
    (good_line(codes=[]), "codes", "non-empty"),
    (good_line(codes="401.9"), "codes", "list"),
    (good_line(codes=["401.9", 4019]), "codes", "element 1"),
    (good_line(codes=["401.9", ""]), "codes", "element 1"),
    (good_line(split="dev"), "split", "unknown split"),
    (good_line(code_system="icd11"), "code_system", "unknown code system"),
])
def test_bad_lines_name_file_line_and_key(tmp_path, line, key, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(good_line() + "\n" + line + "\n" + good_line() + "\n")
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    assert f"{path}:2" in msg
    if key is not None:
        assert f"'{key}'" in msg
    assert needle in msg
    assert SECRET not in msg and "john doe" not in msg
    assert "fix" in msg


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_records([rec(0)], path)
    before = path.read_bytes()

    def broken():
        yield rec(1)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_records(broken(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_sharegpt_export_structure(tmp_path):
    recs = [rec(0), rec(1, system="icd10", codes=("E11.9", "02HV33Z"))]
    entry = write_sharegpt(recs, tmp_path / "mimic3_train.json")
    data = json.loads((tmp_path / "mimic3_train.json").read_text(encoding="utf-8"))
    assert isinstance(data, list) and len(data) == 2
    assert data[0] == {"conversations": [
        {"from": "human", "value": coding_prompt(recs[0].note, "icd9")},
        {"from": "gpt", "value": "<code>401.9, 38.93</code>"}], "id": "100"}
    assert data[1]["conversations"][0]["value"] == coding_prompt(recs[1].note, "icd10")
    assert data[1]["conversations"][1]["value"] == "<code>E11.9, 02HV33Z</code>"
    assert recs[0].note in data[0]["conversations"][0]["value"]
    # LlamaFactory dataset_info.json entry.
    assert entry == {"mimic3_train": {
        "file_name": "mimic3_train.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt"}}}
    assert write_sharegpt([], tmp_path / "empty.json", name="e") == {
        "e": sharegpt_dataset_info("empty.json")}
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_update_dataset_info_merges(tmp_path):
    path = tmp_path / "dataset_info.json"
    update_dataset_info(path, {"b": sharegpt_dataset_info("b.json")})
    update_dataset_info(path, {"a": sharegpt_dataset_info("a.json")})
    info = json.loads(path.read_text())
    assert list(info) == ["a", "b"] and info["b"]["file_name"] == "b.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="dataset_info.json"):
        update_dataset_info(path, {})
