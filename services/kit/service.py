"""The life of a service process: configure, start, loop until SIGTERM, then flush and commit.

A service subclasses `Service` and fills in `start`, `step` and `stop`. `run()` owns everything around them:
logging, tracing, the health endpoint, signal handling and exit codes, so every service behaves the same on
`kubectl delete pod` or Ctrl-C.

Health: the loop beats once per `step`, so a `step` that blocks for longer than HEALTH_PROGRESS_BUDGET_S
(or a service not ready for that long) fails /healthz and Kubernetes restarts the pod (`services.kit.health`).
A step that waits on a dependency uses `services.kit.reconnect`, which beats and marks the dependency down.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Generic, TypeVar

from services.kit.config import ServiceSettings, load_settings
from services.kit.dependencies import DependencyUnavailable
from services.kit.exits import ExitCode
from services.kit.health import Health, HealthServer, HealthSettings
from services.kit.logs import configure_logging
from services.kit.memory import tune_gc_for_throughput
from services.kit.tracing import setup_tracing, shutdown_tracing

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


class Service(Generic[SettingsT]):
    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings
        self.log = logging.getLogger(settings.service_name)
        # HEALTH_PROGRESS_BUDGET_S and HEALTH_PROBE_TIMEOUT_S (a malformed one exits 2 naming it, as any setting).
        self.health = Health.from_settings(load_settings(HealthSettings))
        self.stopping = threading.Event()
        self.tracer = setup_tracing(
            settings.service_name,
            settings.otel_exporter_otlp_endpoint,
            settings.otel_traces_file,
            settings.otel_sample_ratio,
        )
        self.http: HealthServer | None = None

    # --- to fill in -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to dependencies; raise to fail start-up (ExitCode.FAILED with the message)."""

    def step(self) -> bool:
        """One unit of work. Return False when the work is finished (bounded runs); True to go on."""
        raise NotImplementedError

    def stop(self) -> None:
        """Flush and commit; called once, after the last `step`, within `shutdown_timeout_s`. Also called after
        a `start` that failed half-way: close only what `start` made (an attribute it never set is no error)."""

    # --- the frame ----------------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            self.log.info("received %s: finishing", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.http = HealthServer(self.health, self.settings.http_port).start()
        self.log.info("health endpoint on :%d", self.http.port, extra={"http_port": self.http.port})
        exit_code = ExitCode.OK
        try:
            self.start()
            tune_gc_for_throughput()
            self.health.set_ready(True)
            while not self.stopping.is_set():
                self.health.beat()
                if not self.step():
                    break
        except DependencyUnavailable as error:  # the address is the problem, not the code: one line, no trace
            self.log.error("cannot start: %s", error)
            exit_code = ExitCode.FAILED
        except Exception:
            self.log.exception("failed")
            exit_code = ExitCode.FAILED
        finally:
            self.health.set_ready(False, "shutting down")
            watchdog = threading.Timer(self.settings.shutdown_timeout_s, _hard_exit, args=(self.log,))
            watchdog.daemon = True
            watchdog.start()
            try:
                self.stop()
            except Exception:
                self.log.exception("shutdown failed")
                exit_code = ExitCode.FAILED
            finally:
                watchdog.cancel()
                shutdown_tracing()
                self.http.stop()
        self.log.info("stopped", extra={"exit_code": exit_code})
        return exit_code


def _hard_exit(log: logging.Logger) -> None:
    log.error("shutdown took longer than SHUTDOWN_TIMEOUT_S: exiting without a clean flush")
    logging.shutdown()
    import os

    os._exit(ExitCode.SHUTDOWN_TIMEOUT)


def main_for(service_cls: type[Service[SettingsT]], settings_cls: type[SettingsT]) -> int:
    """The usual `__main__`: load settings from the environment (ExitCode.CONFIG if invalid), log, run."""
    settings = load_settings(settings_cls)
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    return service_cls(settings).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run a service module, e.g. python -m services.generator")
