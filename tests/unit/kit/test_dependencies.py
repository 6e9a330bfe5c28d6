"""Waiting for a dependency at start: the one line that names the variable and the address."""

import socket
import time

import pytest

from services.kit.dependencies import DependencyUnavailable, dsn_address, url_address, url_shown, wait_for_tcp
from services.testing.net import free_port


def test_the_message_is_one_line_naming_the_variable_and_address():
    error = DependencyUnavailable("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9", 30)
    assert str(error) == "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9 unreachable after 30 s"
    assert isinstance(error, ConnectionError)
    assert str(DependencyUnavailable("S3_ENDPOINT_URL", "http://h:1", 2.4, "connection refused")).endswith(
        "after 2 s: connection refused"
    )


def test_nothing_listening_fails_after_the_wait():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable) as caught:
        wait_for_tcp("POSTGRES_DSN", f"127.0.0.1:{port}", [("127.0.0.1", port)], timeout_s=1.0)
    assert 0.6 < time.monotonic() - started < 5
    assert str(caught.value).startswith(f"POSTGRES_DSN=127.0.0.1:{port} unreachable after 1 s")


def test_a_listener_answers_at_once():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        wait_for_tcp("S3_ENDPOINT_URL", "x", [("127.0.0.1", port)], timeout_s=5)


def test_addresses_are_shown_without_passwords():
    assert url_shown("http://user:pw@h:9000/p") == "http://h:9000/p"
    assert url_address("https://s3.example") == ("s3.example", 443)
    assert url_address("http://127.0.0.1:18333") == ("127.0.0.1", 18333)
    assert dsn_address("postgresql://u:pw@pg:6543/d") == ("pg", 6543)
    assert dsn_address("host=/var/run/postgresql") is None
