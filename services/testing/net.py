"""Ports and HTTP endpoints of services under test."""

from __future__ import annotations

import urllib.error
import urllib.request

from services.stack.settings import pick_free_ports


def free_port() -> int:
    """A port the kernel reports free on 127.0.0.1 (for a child process's HTTP_PORT and the like)."""
    return pick_free_ports(1)[0]


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET `path` on 127.0.0.1:`port` (None while nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def metric_totals(port: int) -> dict[str, float]:
    """Each metric's samples on 127.0.0.1:`port`/metrics summed over their labels ({} while nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals
