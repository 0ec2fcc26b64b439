"""A mistake on the command line or in a VLMQ_ variable ends a `vlmq` command with one line that names the flag or
variable, the value and what it must be, and exit status 2: before anything connects (no services here)."""

from __future__ import annotations

import pytest

from producer.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    status = main(argv)
    return status, capsys.readouterr().err.splitlines()


def test_an_invalid_job_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["submit", "--task", "qa", "s3://b/k.jpg"], capsys) == (
        2,
        ['vlmq submit: invalid job: task "qa" needs "question"'],
    )
    assert run(["submit", "--max-new-tokens", "0", "--ttl", "-1", "ftp://b/k.jpg"], capsys) == (
        2,
        [
            "vlmq submit: invalid job: URI=ftp://b/k.jpg: unsupported URI 'ftp://b/k.jpg': use s3://bucket/key, "
            "file:///path or https://host/path; --max-new-tokens=0: must be greater than or equal to 1; "
            "--ttl=-1.0: must be greater than 0"
        ],
    )


def test_a_variable_out_of_range(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_VISIBILITY_TIMEOUT_S", "0")
    monkeypatch.setenv("VLMQ_RESULT_EXPIRES_S", "5")

    assert run(["result", "some-id"], capsys) == (
        2,
        [
            "vlmq result: invalid settings: VLMQ_VISIBILITY_TIMEOUT_S=0: must be greater than or equal to 1; "
            "VLMQ_RESULT_EXPIRES_S=5: must be greater than or equal to 60"
        ],
    )


def test_a_list_setting_that_is_not_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_API_KEYS", '["k1')  # a secret: not printed
    api = run(["api"], capsys)
    monkeypatch.delenv("VLMQ_API_KEYS")
    monkeypatch.setenv("VLMQ_ALLOWED_BUCKETS", "[media")
    worker = run(["worker", "--model", "m"], capsys)

    assert api == (
        2,
        [
            "vlmq api: invalid settings: VLMQ_API_KEYS=(hidden): Unterminated string starting at: line 1 column 2 "
            "(char 1)"
        ],
    )
    assert worker == (
        2,
        [
            "vlmq worker: invalid settings: VLMQ_ALLOWED_BUCKETS is not valid JSON (Expecting value: line 1 column 2 "
            '(char 1)); write a list as ["a", "b"]'
        ],
    )


def test_a_validation_error_that_is_no_settings_error_is_a_bug_and_stays_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from producer import cli
    from producer.core.jobs import Job

    def broken(args: object) -> int:
        Job.model_validate({})
        return 0

    monkeypatch.setattr(cli, "cmd_result", broken)
    with pytest.raises(ValidationError, match="validation error for Job"):
        main(["result", "some-id"])
