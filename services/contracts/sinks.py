"""`ContractSinkService`: the kit's sink frame speaking the platform's wire contracts.

The kit's `SinkService` leaves the dead-letter route, the dead-letter topic names and the writer-schema resolver
to its subclass, because the kit imports nothing above it. Every sink of this platform gives the same three
answers (the one dead-letter format, `<topic>.<sink name>.dlq`, writer schemas from the schema store), so they
are given once here instead of in each sink.
"""

from __future__ import annotations

from datetime import datetime

from services.contracts.deadletter import DeadLetterRecord, from_sink_rejection
from services.contracts.schema_store import SchemaStoreSettings, writer_resolver
from services.contracts.topics import dead_letter_topic
from services.kit.avro import WriterResolver
from services.kit.service import SettingsT
from services.kit.sink import Rejection, SinkService


class ContractSinkService(SinkService[SettingsT]):
    """A `SinkService` whose refused records go to `<topic>.<sink name>.dlq` in the platform's dead-letter format
    and whose decoders resolve newer writer schemas from the schema store (settings include
    `SchemaStoreSettings`)."""

    def dead_letter(self, rejection: Rejection, now: datetime) -> DeadLetterRecord:
        return from_sink_rejection(rejection, now=now, sink=self.sink.name)

    def dead_letter_topic(self, topic: str) -> str:
        return dead_letter_topic(topic, self.sink.name)

    def writer_resolver(self) -> WriterResolver | None:
        if not isinstance(self.settings, SchemaStoreSettings):
            raise TypeError(f"{type(self).__name__}'s settings must include SchemaStoreSettings")
        return writer_resolver(self.settings)  # newer writer versions from the operator's schema store
