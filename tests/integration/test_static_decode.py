"""A real worker on the static decode loop (`--decoder static`, the code CUDA graphs capture, eager on CPU): batches
sized by the KV pool, prefills split by their token budget, texts exactly the model card's for each job alone, and
no decode shape built once the worker is ready."""

from __future__ import annotations

from producer import Job
from tests.conftest import Stack
from tests.helpers import scrape
from tests.integration.test_pipeline import expected_text, mixed_jobs, upload_images
from worker.devtools.local_services import free_port

COMPILATIONS = ("vlmq_decode_compilations_total", ())


def test_a_worker_decoding_on_the_static_cache_returns_the_model_card_text_and_builds_nothing_while_serving(
    stack: Stack,
) -> None:
    objects = upload_images(stack, "static")
    jobs = mixed_jobs(list(objects), 14)
    port = free_port()
    # A pool of 1,024 KV tokens: the tiny model's prompts (58-192 tokens) + 12 new ones take 512-token caches, so at
    # most 2 jobs decode together; prefill calls of at most 300 tokens split those pairs further.
    stack.start_worker(
        "--decoder", "static", "--kv-cache-tokens", "1024", "--prefill-tokens", "300", "--max-batch-size", "4",
        "--max-wait-ms", "300", "--metrics-port", str(port),
    )  # fmt: skip
    built = scrape(port)[COMPILATIONS]

    results = stack.client().run(jobs, progress=False, timeout=300)
    again = stack.client().run([Job(**j.model_dump(exclude={"id"}), max_new_tokens=600) for j in jobs[:3]],
                               progress=False, timeout=300)  # fmt: skip

    assert built == 3  # (1, 512), (2, 512), (1, 1024): every shape whose cache fits 1,024 tokens
    assert [r.status for r in results + again] == ["succeeded"] * 17
    assert [r.text for r in results] == [expected_text(stack, j, objects) for j in jobs]
    assert max(r.batch_size for r in results) == 2  # two 512-token caches fill the pool
    assert [r.batch_size for r in again] == [1, 1, 1]  # a 1,024-token cache fills it alone
    after = scrape(port)
    assert after[COMPILATIONS] == built
    assert after[("vlmq_decode_steps_total", ())] > 0 and after[("vlmq_decode_seconds_total", ())] > 0
