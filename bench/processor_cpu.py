"""CPU and page faults of the 0.5B processor on one 640x480 JPEG, alone and with the hand-over to the engine's
process (pickling its output through torch's shared memory, as a preprocessing process does), per allocator.

Each allocator runs in a fresh process (an allocator is chosen when a process starts): glibc's defaults, glibc
with raised thresholds, jemalloc and tcmalloc (Debian's libjemalloc2 and libtcmalloc-minimal4). One thread.

    python bench/processor_cpu.py [--calls 200]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from worker import allocator

LIB = "/usr/lib/x86_64-linux-gnu"
ALLOCATORS = {
    "glibc defaults": {},
    "glibc thresholds": allocator.GLIBC_ENV,
    "jemalloc": {"LD_PRELOAD": f"{LIB}/libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": f"{LIB}/libtcmalloc_minimal.so.4"},
}


def measure(label: str, calls: int, fn: Callable[[], object]) -> str:
    before, cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for _ in range(calls):
        fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    ms = 1000 * (time.process_time() - cpu) / calls
    return f"{label}: {ms:.2f} ms CPU, {(after.ru_minflt - before.ru_minflt) / calls:,.0f} page faults"


def child(processor_dir: str, calls: int) -> None:
    """Runs in the fresh process: the measurements, one line each."""
    from multiprocessing.reduction import ForkingPickler

    import numpy as np
    import torch
    import torch.multiprocessing  # the shared-memory reductions, as in a preprocessing process
    from overhead import photo
    from PIL import Image

    from producer.core.jobs import Generation
    from worker.engines.hf_model import VisionLanguageModel
    from worker.preprocess import shareable

    torch.set_num_threads(1)
    model = VisionLanguageModel.processor_only(processor_dir)
    body = io.BytesIO()
    photo(np.random.default_rng(0), 640, 480).save(body, format="JPEG", quality=90)
    image = Image.open(io.BytesIO(body.getvalue())).convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}]
    sent: list[bytes] = []

    def prepare() -> object:
        return model.prepare(conversation, [image], [], Generation())

    def hand_over() -> None:
        sent.append(bytes(ForkingPickler.dumps(shareable(prepare()))))
        del sent[:-8]  # the engine's process holds a few at a time

    for _ in range(20):
        hand_over()
    print(measure("processor", calls, prepare))
    print(measure("processor + hand-over", calls, hand_over))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        return
    from overhead import write_processor

    with tempfile.TemporaryDirectory() as tmp:
        processor = write_processor(Path(tmp) / "processor", "0.5b")
        for name, env in ALLOCATORS.items():
            argv = [sys.executable, __file__, "--calls", str(args.calls), "--child", str(processor)]
            out = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            for line in out.stdout.splitlines():
                print(f"{name}: {line}", flush=True)


if __name__ == "__main__":
    main()
