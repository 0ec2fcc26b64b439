"""Sample 32 frames from a clip held in memory: decord 0.6.0 vs decord2 3.4.0 vs PyAV, one decode thread each.

The worker's video job: frame indices `np.linspace(0, n - 1, 32, dtype=int)` from a clip held as bytes, returned as
one uint8 array (32, H, W, 3). decord and decord2 are called the same way (`VideoReader(io.BytesIO(data),
ctx=cpu(0), num_threads=1)`, `get_batch(indices).asnumpy()`); PyAV decodes sequentially, keeps the wanted frames
(`to_ndarray(format="rgb24")`) and stops after the last one. decord and decord2 share the import name `decord`, so
every decoder runs in its own process (this script with `--serve`); decord2 is pip-installed into a target dir under
`--cache-dir` on first use. Each process decodes with one thread (`num_threads=1`, PyAV `thread_count=1`,
OMP_NUM_THREADS=1): the figures are per core. CPU time is the process's own (all its threads), so CPU/wall > 1 would
show a decoder using more than one core.

Measured in one run:

- speed: a 60 s 1280x720 30 fps H.264 clip, one warm-up then `--rounds` timed decodes per decoder, round-robin.
  The frames are checked: each synthetic frame carries its index as a binary mark, and pixels are compared between
  decoders (YUV->RGB conversion may differ).
- memory: RSS after 1, 100 and `--leak-decodes` decodes of a 10 s 320x240 H.264 clip, a fresh process per decoder.
- webm: a 3 s 320x240 VP9 WebM clip: does it decode, with the right frames.
- py3.12: `pip download --no-deps` of decord 0.6.0 and decord2 3.4.0 with Python 3.12; if a wheel comes, install it
  into a target dir and decode the small clip with it under Python 3.12.

Clips are generated with PyAV (libx264 / libvpx-vp9) and cached under `--cache-dir`.

    python bench/video_decode.py [--rounds 5] [--leak-decodes 500] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from video_clips import Clip, make_clip
from video_decoders import NUM_FRAMES, Child, sample_indices, serve

DECODERS = ("decord", "decord2", "pyav")
DECORD2_SPEC = "decord2==3.4.0"
PY312_SPECS = ("decord==0.6.0", "decord2==3.4.0")


def ensure_decord2(cache: Path) -> Path:
    """decord2 in its own --target dir (no deps: numpy is this environment's)."""
    site = cache / f"decord2-3.4.0-py{sys.version_info.major}{sys.version_info.minor}"
    if not (site / "decord").is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), DECORD2_SPEC]
        print("$ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return site


def spawn(decoder: str, work: Path, decord2_site: Path, tag: str) -> Child:
    return Child(decoder, work / f"{tag}-{decoder}.log", decord2_site if decoder == "decord2" else None)


def frames_ok(result: dict, clip: Clip) -> bool:
    return result.get("marks") == sample_indices(clip.frames).tolist()


def fmt_error(result: dict) -> str:
    return str(result["error"]).replace("|", "\\|")[:200]


def measure_speed(clip: Clip, rounds: int, work: Path, decord2_site: Path) -> tuple[dict[str, dict], list[str]]:
    children = {d: spawn(d, work, decord2_site, "speed") for d in DECODERS}
    stats: dict[str, dict] = {}
    try:
        for d, child in children.items():
            first = child.call(op="decode", clip=str(clip.path), repeat=1, dump=str(work / f"{d}.npy"))
            took = first["error"] if "error" in first else f"{first['wall_ms'][0]:.0f} ms"
            print(f"  warm-up {d}: {took}", flush=True)
            stats[d] = {**first, "wall": [], "cpu": []}
        live = [d for d in DECODERS if "error" not in stats[d]]
        for r in range(rounds):
            for d in live[r % len(live) :] + live[: r % len(live)]:  # rotate who goes first
                result = children[d].call(op="decode", clip=str(clip.path), repeat=1)
                if "error" in result:
                    stats[d]["error"] = result["error"]
                    continue
                stats[d]["wall"] += result["wall_ms"]
                stats[d]["cpu"] += result["cpu_ms"]
            print(f"  round {r + 1}/{rounds} done", flush=True)
    finally:
        for child in children.values():
            child.close()

    lines = [
        "| decoder | FFmpeg libavcodec | n reported | right frames | ms/clip (median, wall) | min–max ms "
        "| CPU ms/clip | CPU / wall | clips/s per core | vs PyAV |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    ref_cpu = statistics.median(stats["pyav"]["cpu"]) if stats["pyav"].get("cpu") else None
    for d in DECODERS:
        s = stats[d]
        name = f"{d} {s.get('version', '?')}"
        if not s.get("wall"):
            lines.append(f"| {name} | {s.get('libavcodec', '?')} | | | error: {fmt_error(s)} | | | | | |")
            continue
        wall, cpu = statistics.median(s["wall"]), statistics.median(s["cpu"])
        vs = f"{ref_cpu / cpu:.2f}x" if ref_cpu else ""
        lines.append(
            f"| {name} | {s['libavcodec']} | {s['n']} | {'yes' if frames_ok(s, clip) else 'NO'} | {wall:.0f} "
            f"| {min(s['wall']):.0f}–{max(s['wall']):.0f} | {cpu:.0f} | {cpu / wall:.2f} | {1e3 / cpu:.2f} | {vs} |"
        )
    return stats, lines


def compare_frames(work: Path, stats: dict[str, dict]) -> tuple[list[str], float]:
    """Pixel differences between the decoders' warm-up outputs (same clip, same indices if the n agree)."""
    arrays = {d: np.load(work / f"{d}.npy") for d in DECODERS if (work / f"{d}.npy").exists()}
    lines = [
        "| pair | same frame indices (marks) | shape | max abs diff | mean abs diff | values identical | "
        "frames with max diff ≤ 3 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    worst = 0.0
    names = list(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = arrays[a], arrays[b]
            same_marks = "yes" if stats[a]["marks"] == stats[b]["marks"] else "NO"
            if x.shape != y.shape:
                lines.append(f"| {a} vs {b} | {same_marks} | {x.shape} vs {y.shape} | | | | |")
                continue
            diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
            per_frame = diff.reshape(len(diff), -1).max(axis=1)
            worst = max(worst, float(diff.max()))
            lines.append(
                f"| {a} vs {b} | {same_marks} | {'x'.join(map(str, x.shape))} | {int(diff.max())} "
                f"| {diff.mean():.3f} | {(diff == 0).mean():.1%} | {(per_frame <= 3).sum()}/{len(per_frame)} |"
            )
            del diff
    return lines, worst


def measure_memory(clip: Clip, decodes: int, work: Path, decord2_site: Path) -> list[str]:
    mid = min(100, decodes)
    lines = [
        "| decoder | import time | `nvidia/*` libs loaded by the import | RSS before import | after import "
        "| after 1 decode "
        f"| after {mid} | after {decodes} | growth {mid}→{decodes} per decode | peak RSS "
        "| ms/clip (median, wall) | CPU ms/clip | right frames |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in DECODERS:
        child = spawn(d, work, decord2_site, "memory")
        started = time.perf_counter()
        try:
            results = [child.call(op="decode", clip=str(clip.path), repeat=1)]
            if mid > 1:
                results.append(child.call(op="decode", clip=str(clip.path), repeat=mid - 1))
            if decodes > mid:
                results.append(child.call(op="decode", clip=str(clip.path), repeat=decodes - mid))
        finally:
            child.close()
        name = f"{d} {results[0].get('version', '?')}"
        errors = [r for r in results if "error" in r]
        print(f"  {d}: {decodes} decodes in {time.perf_counter() - started:.0f} s", flush=True)
        if errors:
            lines.append(f"| {name} | error: {fmt_error(errors[0])} | | | | | | | | | | | |")
            continue
        mb = [r["rss_kb"] / 1024 for r in results]
        growth = (results[-1]["rss_kb"] - results[1 if len(results) > 2 else 0]["rss_kb"]) / max(1, decodes - mid)
        wall = statistics.median(w for r in results for w in r["wall_ms"])
        cpu = statistics.median(c for r in results for c in r["cpu_ms"])
        ok = all(frames_ok(r, clip) for r in results)
        first = results[0]
        lines.append(
            f"| {name} | {first['import_ms']:.0f} ms | {first['nvidia_libs']} | {first['base_rss_kb'] / 1024:.0f} MB "
            f"| {first['import_rss_kb'] / 1024:.0f} MB | {mb[0]:.0f} MB | {mb[len(mb) // 2]:.0f} MB | {mb[-1]:.0f} MB "
            f"| {growth:+.1f} KB "
            f"| {results[-1]['hwm_kb'] / 1024:.0f} MB | {wall:.1f} | {cpu:.1f} | {'yes' if ok else 'NO'} |"
        )
    return lines


def check_webm(clip: Clip, work: Path, decord2_site: Path) -> list[str]:
    lines = [
        "| decoder | decodes | n reported | right frames | output | error |",
        "|---|---|---:|---|---|---|",
    ]
    for d in DECODERS:
        child = spawn(d, work, decord2_site, "webm")
        try:
            r = child.call(op="decode", clip=str(clip.path), repeat=2)
        finally:
            child.close()
        name = f"{d} {r.get('version', '?')}"
        if "error" in r:
            lines.append(f"| {name} | no | | | | {fmt_error(r)} |")
        else:
            shape = "x".join(map(str, r["shape"])) + f" {r['dtype']}"
            ok = "yes" if frames_ok(r, clip) else f"NO ({r['marks'][:4]}…)"
            lines.append(f"| {name} | yes | {r['n']} | {ok} | {shape} | |")
    return lines


def check_py312(python: Path, cache: Path, clip: Clip, work: Path) -> list[str]:
    lines = [
        "| package | `pip download --no-deps` (Python 3.12) | wheel | `pip install --target` + import + decode "
        "under 3.12 |",
        "|---|---|---|---|",
    ]
    if not python.exists():
        return [*lines, f"| {' / '.join(PY312_SPECS)} | {python} not found | | |"]
    version = subprocess.run([str(python), "--version"], capture_output=True, text=True).stdout.strip()
    for spec in PY312_SPECS:
        cmd = [str(python), "-m", "pip", "download", "--no-deps", "-d", str(cache / "wh312"), spec]
        print("$ " + shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"(?:Saved|File was already downloaded) (\S+\.whl)", proc.stdout)
        wheel = f"`{Path(m.group(1)).name}`" if m else ""
        if proc.returncode != 0 or not m:
            errs = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("ERROR")]
            lines.append(f"| {spec} | failed: {' / '.join(errs)[:200]} | {wheel} | not tried |")
            continue
        site = cache / f"py312-{spec.replace('==', '-')}"
        install = [str(python), "-m", "pip", "install", "-q", "--target", str(site), spec]
        if not (site / "decord").is_dir():
            print("$ " + shlex.join(install), flush=True)
            done = subprocess.run(install, capture_output=True, text=True)
            if done.returncode != 0:
                errs = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
                lines.append(f"| {spec} | ok | {wheel} | install failed: {' / '.join(errs)[:200]} |")
                continue
        child = Child("decord", work / f"py312-{spec}.log", site, str(python))
        try:
            r = child.call(op="decode", clip=str(clip.path), repeat=1)
        finally:
            child.close()
        if "error" in r:
            outcome = f"installed, decode failed: {fmt_error(r)}"
        else:
            right = "right frames" if frames_ok(r, clip) else "WRONG frames"
            outcome = f"ok: Python {r['python']}, decord {r['version']}, {'x'.join(map(str, r['shape']))}, {right}"
        lines.append(f"| {spec} | ok ({version}) | {wheel} | {outcome} |")
    return lines


@dataclass(frozen=True)
class Clips:
    big: Clip  # speed
    small: Clip  # memory, Python 3.12
    webm: Clip


@dataclass(frozen=True)
class Tables:
    speed: list[str]
    diffs: list[str]
    worst: float  # max abs pixel difference between any two decoders
    memory: list[str]
    webm: list[str]
    py312: list[str]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed decodes of the 60 s clip per decoder")
    parser.add_argument("--leak-decodes", type=int, default=500, help="decodes of the small clip per decoder")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/vlmq-bench-video"))
    parser.add_argument("--py312", type=Path, default=Path("/root/.pyenv/versions/3.12.1/bin/python"))
    parser.add_argument("--out", type=Path, default=None, help="append the results to this markdown file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decoder", choices=["decord", "pyav"], help=argparse.SUPPRESS)
    return parser.parse_args()


def make_clips(cache: Path) -> Clips:
    x264 = {"preset": "veryfast", "crf": "23"}
    big = make_clip(cache / "big-720p-60s.mp4", 60, 1280, 720, "libx264", x264)
    small = make_clip(cache / "small-240p-10s.mp4", 10, 320, 240, "libx264", x264)
    webm = make_clip(
        cache / "small-240p-3s.webm", 3, 320, 240, "libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime"}
    )
    return Clips(big, small, webm)


def run_checks(args: argparse.Namespace, clips: Clips, cache: Path, work: Path, decord2_site: Path) -> Tables:
    """Speed, frame comparison, memory, WebM and Python 3.12, in that order, each table printed as it is done."""
    print(f"speed: {clips.big.path.name}, {args.rounds} rounds", flush=True)
    stats, speed = measure_speed(clips.big, args.rounds, work, decord2_site)
    print("\n".join(speed), flush=True)
    diffs, worst = compare_frames(work, stats)
    print("\n".join(diffs), flush=True)
    for d in DECODERS:
        (work / f"{d}.npy").unlink(missing_ok=True)
    print(f"memory: {clips.small.path.name}, {args.leak_decodes} decodes each", flush=True)
    memory = measure_memory(clips.small, args.leak_decodes, work, decord2_site)
    print("\n".join(memory), flush=True)
    print(f"webm: {clips.webm.path.name}", flush=True)
    webm_lines = check_webm(clips.webm, work, decord2_site)
    print("\n".join(webm_lines), flush=True)
    print("python 3.12 install check", flush=True)
    py312 = check_py312(args.py312, cache, clips.small, work)
    print("\n".join(py312), flush=True)
    return Tables(speed, diffs, worst, memory, webm_lines, py312)


def report(
    args: argparse.Namespace, clips: Clips, tables: Tables, loads: tuple[list[str], list[str]], elapsed: float
) -> str:
    """The BENCHMARKS.md section: the machine, the method, then each table."""
    load_before, load_after = loads
    big, small, webm = clips.big, clips.small, clips.webm
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, numpy "
    machine += f"{np.__version__}, {platform.system()} {platform.release()}"
    size_mb = big.path.stat().st_size / 1e6
    bitrate = big.path.stat().st_size * 8 / 60 / 1e6
    return (
        f"\n## Video decoders: decord vs decord2 vs PyAV ({datetime.now(UTC):%Y-%m-%d})\n\n"
        f"- machine: {machine}; load average {' '.join(load_before)} at the start, {' '.join(load_after)} at the "
        f"end (the cores are shared)\n"
        f"- command: `{shlex.join(['python', *sys.argv])}` ({elapsed / 60:.1f} min in all)\n"
        f"- job: {NUM_FRAMES} frames at `np.linspace(0, n - 1, {NUM_FRAMES}, dtype=int)` from bytes in memory, "
        f"returned as uint8 (32, H, W, 3); decord/decord2 `VideoReader(io.BytesIO(data), num_threads=1)` + "
        f'`get_batch`, PyAV sequential decode with `thread_count=1`, `to_ndarray(format="rgb24")`, stopping after '
        f"the last wanted frame; each decoder in its own process with OMP_NUM_THREADS=1. decord2 installed with "
        f"`pip install --no-deps --target DIR {DECORD2_SPEC}`\n"
        f"- clips (synthetic: shifting gradient, moving box, noise, frame index drawn as a binary mark, GOP 60, "
        f"yuv420p): speed {big.desc}, {size_mb:.0f} MB ({bitrate:.1f} Mbit/s); memory {small.desc}; "
        f"webm {webm.desc}\n"
        f"- timings: one warm-up then {args.rounds} timed decode(s) per decoder, round-robin; CPU time is the "
        'process\'s (all threads); clips/s per core = 1000 / CPU ms; "vs PyAV" compares CPU time\n\n'
        f"Speed, {big.frames}-frame clip:\n\n" + "\n".join(tables.speed) + "\n\n"
        "Frames from the warm-up decodes compared (marks = the frame index drawn into each frame, read back):\n\n"
        + "\n".join(tables.diffs)
        + f"\n\nMax abs difference between any two decoders: {tables.worst:.0f} (of 255).\n\n"
        f"Memory, {small.frames}-frame clip, one fresh process per decoder (RSS from /proc/self/status after the "
        f"decoded array is freed):\n\n" + "\n".join(tables.memory) + "\n\n"
        f"WebM/VP9, {webm.frames}-frame clip:\n\n" + "\n".join(tables.webm) + "\n\n"
        f"Python 3.12 (`{args.py312}`), wheel availability and a decode of the small H.264 clip:\n\n"
        + "\n".join(tables.py312)
        + "\n"
    )


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args.decoder)
        return

    started = time.perf_counter()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    cache: Path = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f"run-{os.getpid()}"
    work.mkdir()
    clips = make_clips(cache)
    decord2_site = ensure_decord2(cache)
    tables = run_checks(args, clips, cache, work, decord2_site)

    elapsed = time.perf_counter() - started
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"total {elapsed / 60:.1f} min", flush=True)
    if args.out is None:
        return
    section = report(args, clips, tables, (load_before, load_after), elapsed)
    if not args.out.exists():
        args.out.write_text("# Benchmarks\n\nNumbers from `bench/`; ratios are measured side by side in one run.\n")
    with args.out.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    main()
