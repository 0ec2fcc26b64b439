"""The worker's Prometheus endpoint: after a few jobs its counters and histograms hold exactly what happened."""

from __future__ import annotations

from producer import Job
from tests.conftest import MEDIA_BUCKET, Stack
from tests.helpers import scrape
from tests.reference import encode, random_image
from worker.devtools.local_services import free_port


def test_metrics_count_jobs_batches_and_stages(stack: Stack) -> None:
    s3 = stack.s3.client()
    for i in range(5):
        s3.put_object(Bucket=MEDIA_BUCKET, Key=f"metrics/{i}.png", Body=encode(random_image(40, 30, seed=i), "PNG"))
    port = free_port()
    stack.start_worker("--max-batch-size", "4", "--max-wait-ms", "200", "--metrics-port", str(port))
    jobs = [Job(media=[f"s3://{MEDIA_BUCKET}/metrics/{i}.png"], max_new_tokens=4) for i in range(5)]
    jobs.append(Job(media=[f"s3://{MEDIA_BUCKET}/metrics/missing.png"], max_new_tokens=4))

    results = stack.client().run(jobs, progress=False, timeout=120)
    m = scrape(port)

    assert [r.status for r in results] == ["succeeded"] * 5 + ["failed"]
    assert m[("vlmq_jobs_total", (("code", ""), ("status", "succeeded")))] == 5
    assert m[("vlmq_jobs_total", (("code", "media_not_found"), ("status", "failed")))] == 1
    assert m[("vlmq_ready", ())] == 1
    assert m[("vlmq_model_items_total", ())] == 5
    assert m[("vlmq_batch_size_sum", ())] == 5
    batches = m[("vlmq_batch_size_count", ())]
    assert batches == m[("vlmq_model_seconds_count", ())]
    assert 2 <= batches <= 5  # at most 4 per batch
    assert m[("vlmq_batch_size_bucket", (("le", "4.0"),))] == batches  # none above the maximum
    assert m[("vlmq_queue_wait_seconds_count", ())] == 6
    assert m[("vlmq_media_seconds_count", ())] == 5  # the missing object never got past its fetch
    assert m[("vlmq_model_busy_seconds_total", ())] == m[("vlmq_model_seconds_sum", ())] > 0
    assert m[("vlmq_model_load_seconds", ())] > 0
    assert m[("vlmq_gpu_memory_bytes", ())] == 0  # CPU
