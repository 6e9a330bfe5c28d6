"""Ports and endpoint reads of the shared test helpers, against a small HTTP server in this process."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.testing.net import free_port, http_status, metric_totals

METRICS = b"""# HELP lp_sink_rows_written_total Rows written
# TYPE lp_sink_rows_written_total counter
lp_sink_rows_written_total{sink="clickhouse",table="a"} 3.0
lp_sink_rows_written_total{sink="clickhouse",table="b"} 4.5
lp_sink_rows_written_created{sink="clickhouse",table="a"} 1.7e+09
lp_sink_paused_partitions 0.0
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/metrics":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(METRICS)
        else:
            self.send_response(503)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_metric_totals_sums_each_metric_over_its_labels(server_port: int) -> None:
    assert metric_totals(server_port) == {
        "lp_sink_rows_written_total": 7.5,
        "lp_sink_rows_written_created": 1.7e09,
        "lp_sink_paused_partitions": 0.0,
    }


def test_http_status_gives_error_statuses_and_none_when_nothing_answers(server_port: int) -> None:
    assert http_status(server_port, "/metrics") == 200
    assert http_status(server_port, "/readyz") == 503
    nothing = free_port()
    assert http_status(nothing, "/readyz") is None
    assert metric_totals(nothing) == {}


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname()[1] == port
