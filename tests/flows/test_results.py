"""Task results a resume takes back live in the output store (`tasks.edit.StoreResults`) and are read
only as plain JSON: whoever can write to the store must not make a resume run code."""

from __future__ import annotations

import json

import pytest
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import Serializer

from storage.store import open_store
from tasks.edit import StoreResults


def record(result, serializer: str = "json") -> bytes:
    return ResultRecord(result=result, metadata=ResultRecordMetadata(
        serializer=Serializer(type=serializer), storage_key="k")).serialize()


def test_a_json_record_is_written_under_prefect_results_and_read_back(tmp_path):
    results = StoreResults(root=str(tmp_path / "out"))
    data = record({"partition": "p0", "items": 3})
    results.write_path("abc123", data)
    assert open_store(str(tmp_path / "out")).get_bytes("prefect-results/abc123") == data
    assert ResultRecord.deserialize(results.read_path("abc123")).result == {"partition": "p0", "items": 3}


@pytest.mark.parametrize("forged", [
    record({"partition": "p0"}, serializer="pickle"),
    # Prefect's JSON decoder imports the module a `__class__` names.
    record({"when": {"__class__": "antigravity.fly", "data": 1}}),
])
def test_a_record_that_would_run_or_import_code_is_refused(tmp_path, forged):
    out = open_store(str(tmp_path / "out"))
    out.put_bytes("prefect-results/abc123", forged)
    with pytest.raises(ValueError, match="not a plain JSON record"):
        StoreResults(root=str(tmp_path / "out")).read_path("abc123")


def test_a_json_record_with_another_decoder_is_refused(tmp_path):
    forged = json.loads(record({"a": 1}))
    forged["metadata"]["serializer"]["object_decoder"] = "os.system"
    open_store(str(tmp_path / "out")).put_bytes("prefect-results/abc123", json.dumps(forged).encode())
    with pytest.raises(ValueError, match="not a plain JSON record"):
        StoreResults(root=str(tmp_path / "out")).read_path("abc123")


def test_a_bare_or_broken_file_is_refused(tmp_path):
    out = open_store(str(tmp_path / "out"))
    for n, data in enumerate([b'{"a": 1}', b"\x80\x04not json", b"[]"]):
        out.put_bytes(f"prefect-results/k{n}", data)
        with pytest.raises(ValueError, match="not a plain JSON record"):
            StoreResults(root=str(tmp_path / "out")).read_path(f"k{n}")
