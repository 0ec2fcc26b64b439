"""`make offline-bundle BUNDLE=DIR BUNDLE_PYTHON=3.12`: what an air-gapped GPU host needs to run vlmq's GPU
benchmark (`bench/gpu.py --no-s3 --engines hf`) and `tests/gpu`, when it has only torch, transformers, numpy and
Pillow (and what they need) and no network.

The bundle (about 40 MB; the device machines take 64 MiB per call):
- `wheels/`: manylinux x86_64 wheels for CPython BUNDLE_PYTHON of everything vlmq's worker, the benchmark and the
  GPU tests need beyond that stack, at the versions installed here (a tested set); none of the host's own packages
  (torch, transformers, numpy, ...), which a second copy would shadow;
- `bin/redis-server`: this machine's redis-server and, in `lib/`, the shared libraries it links except glibc's (a
  wrapper sets LD_LIBRARY_PATH for it alone, so torch never sees them);
- `src/`: this checkout's tracked files; `media/clip.mp4`: the benchmark's H.264 clip, encoded here (PyAV, 35 MB,
  stays out);
- `install.sh` (once: the wheels into `site/`, no index), `env.sh` (PYTHONPATH, PATH), `run-gpu.sh` (the benchmark
  then tests/gpu).

    python infra/offline_bundle.py DIR [--python 3.12]
"""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# What a GPU host's torch + transformers stack already has; a wheel of these would shadow its own build.
HOST_HAS = {
    "torch", "torchvision", "triton", "transformers", "tokenizers", "safetensors", "huggingface-hub", "hf-xet",
    "numpy", "pillow", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock",
}  # fmt: skip
# Beyond the package's own dependencies: the benchmark (psutil) and the GPU tests (pytest).
EXTRA = ["psutil", "pytest", "pytest-timeout"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64"]
GLIBC = ("linux-vdso", "libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux")
MAX_BYTES = 60 * 1024 * 1024


def host_provided(name: str) -> bool:
    name = canonicalize_name(name)
    return name in HOST_HAS or name.startswith(("nvidia-", "cuda-"))


def requirements() -> list[str]:
    """vlmq's runtime requirements (the package and its worker extra) that the host lacks, plus EXTRA."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["worker"], *EXTRA]
    return [r for r in wanted if not host_provided(Requirement(r).name)]


def constraints(path: Path) -> Path:
    """Pin every distribution installed here to its version: the bundle holds the set the tests ran with."""
    pins = sorted({f"{canonicalize_name(d.metadata['Name'])}=={d.version}" for d in metadata.distributions()})
    path.write_text("\n".join(p for p in pins if not p.startswith("vlmq==")) + "\n")
    return path


def download_wheels(out: Path, python: str, work: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python, *platforms,
               "-c", str(constraints(work / "constraints.txt")), "-d", str(out), *requirements()]  # fmt: skip
    subprocess.run(command, check=True)
    for wheel in out.glob("*.whl"):
        if host_provided(wheel.name.split("-")[0]):
            wheel.unlink()
    return sorted(out.glob("*.whl"))


def copy_redis(bundle: Path) -> None:
    """redis-server and the libraries it links (not glibc's), behind a wrapper that finds them."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("offline_bundle: redis-server is not installed here. Hint: apt-get install redis-server")
    (bundle / "bin").mkdir(parents=True, exist_ok=True)
    (bundle / "lib").mkdir(exist_ok=True)
    shutil.copy2(binary, bundle / "bin" / "redis-server.bin")
    for line in subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if "=>" in parts and not any(p in parts[0] for p in GLIBC):
            shutil.copy2(parts[parts.index("=>") + 1], bundle / "lib" / parts[0])
    script(
        bundle / "bin" / "redis-server",
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        'LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"\n',
    )


def copy_source(bundle: Path) -> None:
    """The checkout's tracked files as they are in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = bundle / "src" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def make_clip(bundle: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import GPU
    from video_clips import make_clip as encode

    width, height, seconds = GPU.clip
    (bundle / "media").mkdir(exist_ok=True)
    encode(bundle / "media" / "clip.mp4", seconds, width, height, "libx264", {"preset": "veryfast", "crf": "23"})


def scripts(bundle: Path) -> None:
    here = 'here=$(cd "$(dirname "$0")" && pwd)\n'
    script(
        bundle / "install.sh",
        "# Once, on the host: the wheels into site/ (no index, no network).\nset -eu\n" + here
        + 'python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$here/site" \\\n'
        + '    "$here"/wheels/*.whl\n'
        + 'echo "installed $(ls "$here"/wheels | wc -l) wheels into $here/site; next: . $here/env.sh"\n',
    )  # fmt: skip
    (bundle / "env.sh").write_text(
        "# Source it: . BUNDLE/env.sh\n"
        'here=$(cd "$(dirname "${BASH_SOURCE:-$0}")" && pwd)\n'
        'export PYTHONPATH="$here/src:$here/site${PYTHONPATH:+:$PYTHONPATH}"\n'
        'export PATH="$here/bin:$here/site/bin:$PATH"\n'
    )
    script(
        bundle / "run-gpu.sh",
        "# The GPU benchmark (hf engine, Redis only), then the GPU tests. Arguments go to bench/gpu.py.\nset -eu\n"
        + here + '[ -d "$here/site" ] || sh "$here/install.sh"\n. "$here/env.sh"\ncd "$here/src"\n'
        + 'python3 bench/gpu.py --no-s3 --engines hf --clip "$here/media/clip.mp4" "$@"\n'
        + "python3 -m pytest tests/gpu -q -s -p no:cacheprovider\n",
    )  # fmt: skip


def script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="directory to write (emptied first)")
    parser.add_argument("--python", default="3.12", help="the host's CPython version (default 3.12)")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    wheels = download_wheels(bundle / "wheels", args.python, bundle)
    (bundle / "constraints.txt").unlink()
    copy_redis(bundle)
    copy_source(bundle)
    make_clip(bundle)
    scripts(bundle)
    total = size(bundle)
    print(
        f"{bundle}: {len(wheels)} wheels for CPython {args.python} ({size(bundle / 'wheels') / 2**20:.1f} MiB), "
        f"redis-server ({size(bundle / 'bin') / 2**20 + size(bundle / 'lib') / 2**20:.1f} MiB), source, clip: "
        f"{total / 2**20:.1f} MiB in all.\nOn the host: sh {bundle.name}/run-gpu.sh (or: sh install.sh; . env.sh)"
    )
    if total > MAX_BYTES:
        sys.exit(f"offline_bundle: {total / 2**20:.1f} MiB is over {MAX_BYTES / 2**20:.0f} MiB; a device call takes 64")


if __name__ == "__main__":
    main()
