"""For tests and demos: demo, tiny model, local services, fault injection (production: hook off unless VLMQ_FAULTS)."""
