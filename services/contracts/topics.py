"""Topic names (declared as KafkaTopic resources under deploy/k8s/topics) and how related topics are named.

A consumer's retry topic is `<topic>.retry`; a dead-letter topic is `<topic>.dlq`, or `<topic>.<consumer>.dlq`
when several consumers of one topic dead-letter its records for their own reasons (the sinks).
"""

from __future__ import annotations

RETRY_SUFFIX = ".retry"
DLQ_SUFFIX = ".dlq"

# Raw events (ingest API, generator) and the validator's outputs.
EVENTS_RAW = "events.raw"
EVENTS_RAW_RETRY = EVENTS_RAW + RETRY_SUFFIX  # late references wait here (the validator's retry policy)
EVENTS_PROCESSED = "events.processed"
TRANSACTIONS_PROCESSED = "transactions.processed"
TRANSACTIONS_STATUS_HISTORY = "transactions.status_history"

# Change data capture (Debezium): `cdc.postgres.<table>` per captured table, plus its heartbeats and offsets.
CDC_TOPIC_PREFIX = "cdc.postgres."
CDC_USERS = CDC_TOPIC_PREFIX + "users"
CDC_PRODUCTS = CDC_TOPIC_PREFIX + "products"
CDC_TRANSACTIONS = CDC_TOPIC_PREFIX + "transactions"
CDC_HEARTBEAT = "cdc.heartbeat"
CDC_OFFSETS = "_lp_cdc_offsets"  # Debezium Server's offset store in Kubernetes (internal)

CDC_TOPICS = (CDC_USERS, CDC_PRODUCTS, CDC_TRANSACTIONS)
REFERENCE_TOPICS = (CDC_USERS, CDC_PRODUCTS)  # reference data the validator enriches events with


def retry_topic(topic: str) -> str:
    """`events.raw` -> `events.raw.retry`."""
    return topic + RETRY_SUFFIX


def dead_letter_topic(topic: str, consumer: str | None = None) -> str:
    """`events.raw` -> `events.raw.dlq`; with a consumer (a sink's name): `events.processed.clickhouse.dlq`."""
    return f"{topic}.{consumer}{DLQ_SUFFIX}" if consumer else topic + DLQ_SUFFIX


def is_dead_letter_topic(topic: str) -> bool:
    return topic.endswith(DLQ_SUFFIX)


def cdc_topic(table: str) -> str:
    """`users` -> `cdc.postgres.users`."""
    return CDC_TOPIC_PREFIX + table
