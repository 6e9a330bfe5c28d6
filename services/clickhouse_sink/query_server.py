"""The running sink answers the named live queries over HTTP: `GET /query?name=funnel` -> JSON.

chDB keeps one process per data folder (it locks the folder), so while the sink runs locally no other
process can open its tables, not even read-only. The sink therefore serves the live views itself, on
`CLICKHOUSE_SINK_QUERY_PORT` (127.0.0.1 by default), and `python -m services.clickhouse_sink query NAME` asks it
there; with no sink running, the command opens the folder directly. Only the named queries of `queries.py`
run: no SQL is accepted from the request. Against a ClickHouse server the command queries the server.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from services.stores import clickhouse_queries as queries

log = logging.getLogger(__name__)


class QueryServer:
    def __init__(self, rows: queries.Rows, database: str, host: str, port: int) -> None:
        handler = _handler(rows, database)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="query-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> QueryServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(rows: queries.Rows, database: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path != "/query":
                self._send(404, {"error": "not found; try /query?name=" + "|".join(queries.QUERIES)})
                return
            name = (parse_qs(url.query).get("name") or [""])[0]
            if not name:
                self._send(200, {"queries": list(queries.QUERIES)})
                return
            try:
                result = queries.run(name, rows, database)
            except KeyError as error:
                self._send(404, {"error": str(error.args[0])})
                return
            except Exception as error:  # the store may be detached or busy: answer, do not crash the thread
                log.warning("query %s failed: %s", name, error)
                self._send(503, {"error": f"{type(error).__name__}: {error}"})
                return
            self._send(200, result.as_dict())

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
