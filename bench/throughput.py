"""Images/s through the full queue (Redis + S3 + `vlmq worker`) vs the bare in-process loop, at batch 1, 8, 16.

The bare loop is what a script would do without vlmq: decode the images, run the processor on a batch (left
padding) and call `generate`, same model, same jobs, same batch size. The pipeline number is wall time from the
first submission to the last result, with the worker already started and warm.

    python bench/throughput.py [--jobs 96] [--batch-sizes 1 8 16] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from producer import Client, ClientSettings, Job
from producer.core.jobs import Generation
from worker.devtools.local_services import start_worker

from common import ROOT, SIZES, append_section, local_stack, machine, make_images

MAX_NEW_TOKENS = 16


def bare_loop(model_dir: Path, images: list[bytes], batch_size: int) -> float:
    """Images/s of decode + processor + generate in this process, `batch_size` images per call."""
    import torch
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)

    def run(chunk: list[bytes]) -> None:
        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk]
        inputs = processor(images=decoded, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)

    run(images[:batch_size])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(images), batch_size):
        run(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - started)


def pipeline(env: dict[str, str], model_dir: Path, uris: list[str], batch_size: int, workdir: Path) -> float:
    """Images/s through Client -> Redis -> worker -> S3 + Redis, worker warm."""
    queue = f"bench-{batch_size}"
    settings = ClientSettings(
        broker_url=env["VLMQ_BROKER_URL"],
        s3_endpoint_url=env["VLMQ_S3_ENDPOINT_URL"],
        results_bucket=env["VLMQ_RESULTS_BUCKET"],
        queue=queue,
    )
    client = Client(settings)
    args = ("--device", "cpu", "--max-batch-size", str(batch_size), "--queue", queue)
    worker = start_worker(model_dir, workdir, *args, env=env, name=f"worker-{batch_size}")
    try:
        generation = Generation(max_new_tokens=MAX_NEW_TOKENS)
        prompt = "Describe this image."
        warm = [Job(media=[u], prompt=prompt, generation=generation) for u in uris[:batch_size]]
        client.run(warm, progress=False, timeout=300)
        jobs = [Job(media=[u], prompt=prompt, generation=generation) for u in uris]
        started = time.perf_counter()
        results = client.run(jobs, progress=False, timeout=600, poll_interval_s=0.02)
        elapsed = time.perf_counter() - started
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        sizes = [r.batch_size or 0 for r in results]
        print(f"  pipeline batch {batch_size}: mean batch size {sum(sizes) / len(sizes):.1f}", flush=True)
        return len(jobs) / elapsed
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=96)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--worker-torch-threads", type=int, default=1, help="worker's VLMQ_TORCH_THREADS")
    args = parser.parse_args()

    import torch

    from worker.devtools.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="vlmq-bench-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "model")
        images = make_images(args.jobs)
        with local_stack(work, VLMQ_TORCH_THREADS=str(args.worker_torch_threads)) as stack:
            uris = [stack.upload(f"img/{i:05d}.jpg", body) for i, body in enumerate(images)]
            rows = []
            for b in args.batch_sizes:
                bare = bare_loop(model_dir, images, b)
                print(f"bare batch {b}: {bare:.1f} img/s", flush=True)
                piped = pipeline(stack.env, model_dir, uris, b, work)
                print(f"pipeline batch {b}: {piped:.1f} img/s ({piped / bare:.0%} of bare)", flush=True)
                rows.append((b, bare, piped))

    base_bare, base_pipe = rows[0][1], rows[0][2]
    lines = [
        "| max batch size | bare loop img/s | pipeline img/s | pipeline / bare | bare vs batch "
        f"{rows[0][0]} | pipeline vs batch {rows[0][0]} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b, bare, piped in rows:
        ratios = f"{piped / bare:.0%} | {bare / base_bare:.1f}x | {piped / base_pipe:.1f}x"
        lines.append(f"| {b} | {bare:.1f} | {piped:.1f} | {ratios} |")
    table = "\n".join(lines)
    print(table)
    sizes = args.batch_sizes
    section = (
        f"\n## Queue throughput vs bare loop ({datetime.now(UTC):%Y-%m-%d})\n\n"
        f"- machine: {machine()}, no GPU (CPU fp32)\n"
        f"- command: `python bench/throughput.py --jobs {args.jobs} --batch-sizes {' '.join(map(str, sizes))} "
        f"--worker-torch-threads {args.worker_torch_threads}`\n"
        f"- torch threads: worker {args.worker_torch_threads} (VLMQ_TORCH_THREADS), bare loop torch's default "
        f"({torch.get_num_threads()})\n"
        f"- model: `vlmq make-tiny-model` defaults (random weights, 32 px crops, ~20 ms per image alone); "
        f"{args.jobs} JPEG images in {len(SIZES)} sizes, {MAX_NEW_TOKENS} new tokens, greedy\n\n{table}\n"
    )
    append_section(args.out, section)


if __name__ == "__main__":
    main()
