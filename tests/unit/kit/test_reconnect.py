import logging
import random
import threading

import pytest

from services.kit.health import Health
from services.kit.reconnect import Backoff, ReconnectAborted, one_line, reconnect


def test_backoff_grows_exponentially_with_jitter_up_to_the_maximum():
    backoff = Backoff(initial_s=1.0, max_s=8.0)
    rng = random.Random(1)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        delays = {backoff.delay(attempt, rng) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered: clients do not retry in step


def test_reconnect_retries_with_one_line_per_attempt_and_marks_the_dependency(caplog):
    health = Health(progress_budget_s=60)
    health.set_ready(True)
    attempts = []
    seen_down = []

    def open_session() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            seen_down.append(health.readiness()[0])
            raise ConnectionError("connection refused\nsecond line of a long story")
        return "session"

    with caplog.at_level(logging.INFO):
        session = reconnect(
            open_session, "snowflake", log=logging.getLogger("t"), health=health, backoff=Backoff(0.01, 0.02)
        )
    assert session == "session" and len(attempts) == 3
    assert seen_down == [True, False]  # down from the first failure on
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    firsts = [r.getMessage().split(" (")[0] for r in warnings]
    assert firsts == ["snowflake: reconnect attempt 1 failed", "snowflake: reconnect attempt 2 failed"]
    assert all(r.exc_info is None and "second line" not in r.getMessage() for r in warnings)
    assert "reconnected after 3 attempts" in caplog.records[-1].getMessage()
    assert health.readiness()[0]


def test_reconnect_stops_when_the_service_stops():
    stopping = threading.Event()
    stopping.set()

    def refuses() -> None:
        raise OSError("refused")

    with pytest.raises(ReconnectAborted, match="stopping"):
        reconnect(refuses, "clickhouse", log=logging.getLogger("t"), stopping=stopping, backoff=Backoff(5, 5))
    with pytest.raises(ReconnectAborted, match="after 2 attempts"):
        reconnect(refuses, "clickhouse", log=logging.getLogger("t"), backoff=Backoff(0.001, 0.001), max_attempts=2)


def test_one_line_is_the_type_and_the_first_line():
    assert one_line(ValueError("a\nb")) == "ValueError: a"
    assert one_line(ValueError()) == "ValueError"
    assert len(one_line(ValueError("x" * 1000))) == 300
