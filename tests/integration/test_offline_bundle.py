"""`make offline-bundle` on a host like the air-gapped GPU machines: a Python with only the torch + transformers stack
(numpy, Pillow and what they need), no vlmq dependencies, no redis-server on PATH, no network. The bundle, made here
for this Python, must be all the GPU benchmark and tests need: its smoke run (the same code path on CPU) passes there,
and so do tests/gpu rehearsed on the CPU (VLMQ_GPU_TESTS_ON_CPU=1)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HOST_STACK = ["torch", "torchvision", "transformers", "numpy", "pillow"]


def closure(names: list[str]) -> set[str]:
    """The installed distributions `names` need, extras they ask for included (markers for this interpreter)."""
    seen: set[str] = set()
    todo = [(name, frozenset[str]()) for name in names]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        try:
            requires = metadata.requires(key) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for line in requires:
            req = Requirement(line)
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras})
            if wanted and canonicalize_name(req.name) not in seen:
                todo.append((req.name, frozenset(req.extras)))
    return seen


def host_python(where: Path) -> Path:
    """A venv that sees only the host stack: links to those distributions' files from a .pth'd directory."""
    venv.create(where / "venv", with_pip=True)
    stack = where / "stack"
    stack.mkdir()
    for name in closure(HOST_STACK):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__", "bin"}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (stack / top).exists():
                (stack / top).symlink_to(source)
    python = where / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "host-stack.pth").write_text(f"{stack}\n")
    return python


def test_the_offline_bundle_is_all_a_torch_only_host_needs_for_the_gpu_benchmark(tmp_path: Path) -> None:
    version = ".".join(platform.python_version_tuple()[:2])
    bundle = tmp_path / "bundle"
    subprocess.run([sys.executable, ROOT / "infra" / "offline_bundle.py", bundle, "--python", version], check=True)
    python = host_python(tmp_path / "host")
    probe = "import torch, transformers, PIL, numpy\ntry:\n import celery\nexcept ImportError: print('bare')"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip() == "bare"
    env = {
        "PATH": f"{python.parent}:/usr/bin:/bin",  # no redis-server: /usr/bin's is hidden below
        "HOME": str(tmp_path),
        "PIP_NO_INDEX": "1",
        "HF_HUB_OFFLINE": "1",
        "VLMQ_GPU_TESTS_ON_CPU": "1",  # tests/gpu rehearse on the CPU (fp32) instead of skipping
    }
    hidden = shutil.which("redis-server") or ""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("sh", "env", "ls", "wc", "dirname", "ldd", "nproc", "git", "uname", "cat"):  # what the scripts run
        if found := shutil.which(tool):
            (fake_bin / tool).symlink_to(found)
    env["PATH"] = f"{python.parent}:{fake_bin}"
    assert not any(Path(p, "redis-server").exists() for p in env["PATH"].split(os.pathsep)), hidden

    result = subprocess.run(
        ["sh", bundle / "run-gpu.sh", "--smoke", "--budget-s", "400"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hf engine, CUDA graphs, memory-sized batches (default)" in result.stdout
    # tests/gpu ran on the CPU with the bundle's packages: the hf cases token-exact, the vllm one skipped.
    assert "4 passed, 1 skipped" in result.stdout
