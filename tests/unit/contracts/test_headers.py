"""Header names are wire strings: these pin them, and the traceparent reader every dead letter uses."""

from __future__ import annotations

import pytest

from services.contracts import headers
from services.contracts.headers import (
    DLQ_HEADERS,
    DLQ_PREFIX,
    REPLAY_PREFIX,
    RETRY_HEADERS,
    RETRY_PREFIX,
    trace_id_from_headers,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()


def test_dead_letter_header_names() -> None:
    assert DLQ_HEADERS == (
        "lp-dlq-error-code",
        "lp-dlq-rule",
        "lp-dlq-field",
        "lp-dlq-message",
        "lp-dlq-stage",
        "lp-dlq-original-topic",
        "lp-dlq-original-partition",
        "lp-dlq-original-offset",
        "lp-dlq-time",
        "lp-dlq-trace-id",
        "lp-dlq-attempt",
    )
    assert (headers.DLQ_VALUE_TRUNCATED_FROM, headers.DLQ_VALUE_SHA256) == (
        "lp-dlq-value-truncated-from",
        "lp-dlq-value-sha256",
    )


def test_other_header_names() -> None:
    assert RETRY_HEADERS == (
        "lp-retry-attempt",
        "lp-retry-not-before",
        "lp-retry-first-seen",
        "lp-retry-rule",
        "lp-retry-original-topic",
        "lp-retry-original-partition",
        "lp-retry-original-offset",
    )
    assert (headers.REPLAY_ID, headers.REPLAY_SOURCE, headers.REPLAY_SNAPSHOT) == (
        "lp-replay-id",
        "lp-replay-source",
        "lp-replay-snapshot",
    )
    assert (headers.CDC_LSN, headers.CDC_OP, headers.INJECTED_FAULT) == ("lp-cdc-lsn", "lp-cdc-op", "lp-injected-fault")


def test_each_family_shares_its_prefix() -> None:
    """Stale bookkeeping is dropped by prefix, so a header outside its family's prefix would survive."""
    names = {name: value for name, value in vars(headers).items() if name.isupper() and isinstance(value, str)}
    for family, prefix in (("DLQ_", DLQ_PREFIX), ("RETRY_", RETRY_PREFIX), ("REPLAY_", REPLAY_PREFIX)):
        members = {name: value for name, value in names.items() if name.startswith(family)}
        assert members and all(value.startswith(prefix) for value in members.values()), members


@pytest.mark.parametrize(
    ("record_headers", "expected"),
    [
        ([("traceparent", TRACEPARENT)], TRACE_ID),
        ([("traceparent", TRACEPARENT.upper())], TRACE_ID),
        ([("other", b"x"), ("traceparent", TRACEPARENT)], TRACE_ID),
        ([("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")], None),
        ([("traceparent", b"garbage")], None),
        ([("traceparent", None)], None),
        ([], None),
        (None, None),
    ],
)
def test_trace_id_from_headers(record_headers, expected) -> None:
    assert trace_id_from_headers(record_headers) == expected
