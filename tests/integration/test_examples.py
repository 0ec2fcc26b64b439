"""The README's and docs' examples run as they are written against one `vlmq up` (the tiny model): every code block
marked `<!-- example: NAME -->` is taken from the markdown and run, each file's blocks in order in one directory,
in a shell that has the settings `vlmq up` printed. A broken example fails its test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.upstack import ROOT, Up, start_up
from worker.devtools.samples import sample_images

MARKER = re.compile(r"^<!-- example: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)^```$", re.M | re.S)
NODE = ROOT / "tests" / "node"
# What each example prints when it works (its exit status must be 0 too): a line per example, searched in stdout.
EXPECTED = {
    "python-client": r"^succeeded \S",
    "cli": r'"status": "succeeded"',
    "curl": r'"status":"succeeded"',
    "openai-python": r"CompletionUsage\(completion_tokens=\d+",
    "openai-typescript": r"\S",
    "celery-node": r"\S",
    "curl-native-routes": r'"name":"tour-samples"',
    "openai-batch": r"^missing media_not_found$",
    "batch-cli": r"",
    "batch-python": r"^completed 3 0 0$",
}


@dataclass(frozen=True)
class Example:
    source: Path
    name: str
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.name}"


def examples() -> list[Example]:
    found = []
    for source in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, language, code in MARKER.findall(source.read_text()):
            found.append(Example(source, name, language, code))
    return found


def test_every_example_is_found_and_has_its_expected_output() -> None:
    assert sorted(e.name for e in examples()) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Up]:
    stack = start_up(tmp_path_factory.mktemp("examples") / "data", tiny_model)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """One directory per markdown file, with `photo.jpg` (what the examples upload) and the JavaScript packages."""
    dirs = {}
    for source in {e.source for e in examples()}:
        workdir = tmp_path_factory.mktemp(source.stem)
        (workdir / "photo.jpg").write_bytes(next(sample_images(1))[1])
        (workdir / "node_modules").symlink_to(NODE / "node_modules")
        dirs[source] = workdir
    return dirs


def command(example: Example, workdir: Path) -> list[str]:
    """How to run the block: Python with this interpreter, shell with bash, JavaScript and TypeScript with node."""
    suffix = {"python": ".py", "bash": ".sh", "javascript": ".mjs", "typescript": ".mts"}[example.language]
    path = workdir / f"{example.name}{suffix}"
    path.write_text(example.code)
    if example.language == "python":
        return [sys.executable, str(path)]
    if example.language == "bash":
        return ["bash", "-euo", "pipefail", str(path)]
    if example.language == "javascript":
        return ["node", str(path)]
    tsc = NODE / "node_modules" / ".bin" / "tsc"  # type-checked against the openai package, then run
    flags = "--strict --target es2022 --module nodenext --moduleResolution nodenext --types node --outDir out"
    return ["sh", "-c", f"{tsc} {flags} {path.name} && node out/{path.stem}.mjs"]


@pytest.mark.parametrize("example", examples(), ids=str)
def test_the_example_runs_as_written(example: Example, up: Up, workdirs: dict[Path, Path]) -> None:
    if example.language in ("javascript", "typescript") and not (NODE / "node_modules").is_dir():
        pytest.fail("tests/node/node_modules is missing: run `npm ci --prefix tests/node` (make install does)")
    workdir = workdirs[example.source]
    env = up.client_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `vlmq`
    done = subprocess.run(command(example, workdir), cwd=workdir, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, f"{example} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert re.search(EXPECTED[example.name], done.stdout, re.M), f"{example} printed:\n{done.stdout}\n{done.stderr}"
