"""The producer's public API: what `from producer import ...` offers, and an error tree users can catch."""

from __future__ import annotations

import pytest

import producer

EXPECTED = {
    "BatchHandle",
    "BatchStatus",
    "Client",
    "ClientSettings",
    "DeadLetter",
    "Generation",
    "InvalidBatchName",
    "InvalidManifest",
    "Job",
    "JobError",
    "JobHandle",
    "JobResult",
    "Media",
    "Message",
    "MessagePart",
    "MissingExtra",
    "ResultTimeout",
    "ResultWriteError",
    "Timings",
    "VideoSampling",
    "VlmqClientError",
    "read_manifest",
    "validate_manifest",
}


def test_all_lists_exactly_the_public_names_and_each_resolves() -> None:
    assert sorted(producer.__all__) == sorted(EXPECTED)
    assert len(producer.__all__) == len(EXPECTED)  # no name twice
    for name in producer.__all__:
        assert getattr(producer, name) is not None, name


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (producer.ResultTimeout("no result"), TimeoutError),
        (producer.InvalidBatchName("bad name"), ValueError),
        (producer.InvalidManifest("jobs.jsonl", []), ValueError),
        (producer.MissingExtra("needs pyarrow"), RuntimeError),
        (producer.ResultWriteError("could not write"), Exception),
    ],
)
def test_each_client_error_is_caught_by_the_base_and_by_its_builtin(error: Exception, builtin: type) -> None:
    with pytest.raises(producer.VlmqClientError):
        raise error
    with pytest.raises(builtin):
        raise error


def test_an_invalid_batch_name_is_refused_before_anything_is_sent() -> None:
    client = producer.Client(broker_url="redis://127.0.0.1:1/0")  # nothing listens there: nothing may connect
    with pytest.raises(producer.InvalidBatchName, match="batch name 'no spaces'"):
        client.submit_batch("no spaces", [], progress=False)


def test_parquet_without_pyarrow_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import sys

    from producer.export import write_results

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(producer.MissingExtra, match=r"pip install -e '\.\[parquet\]' in vlmq's checkout"):
        write_results(lambda out, errors: (0, 0, 0), str(tmp_path / "out.parquet"), str(tmp_path / "err.parquet"))
