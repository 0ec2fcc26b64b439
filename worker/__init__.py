"""vlmq\x27s GPU side: the Celery worker, the micro-batcher and the model holder."""
