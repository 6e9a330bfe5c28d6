"""Avro payloads without a schema-registry server.

Payloads use Avro *single-object encoding* (spec 1.9+): two marker bytes `C3 01`, the writer schema's
8-byte CRC-64-AVRO fingerprint (little endian), then the binary body. The fingerprint names the writer schema,
so a reader can resolve old versions against the current contract, and a record written with an unknown schema
is told apart from a truncated or garbage one. Decoding never raises on bad data: it returns `Decoded` or
`DecodeError`, so a dead-letter queue is just the error route.

A writer schema the files do not have (a producer already on v2 while this consumer still has v1) is asked of the
repository's `resolver`, e.g. `services.contracts.schema_store.StoreWriterResolver` over the `_lp_schemas` topic.
A resolver that cannot reach its store raises `SchemaStoreUnavailable`: decoding raises it too, because that is
the consumer's problem to retry, not the record's fault, and must never become a dead letter.
"""

from __future__ import annotations

import io
import json
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint as _fingerprint
from fastavro.schema import to_parsing_canonical_form

from services.kit.avro_fast import compile_plan, compile_reader
from services.kit.paths import avro_schema_dir

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8
_FINGERPRINT = struct.Struct("<Q")


def schema_fingerprint(parsed: Any) -> int:
    """CRC-64-AVRO of the schema's Parsing Canonical Form, as an unsigned int."""
    return int(_fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"), 16)


@dataclass(frozen=True)
class Schema:
    name: str  # the subject: file stem, e.g. "raw_event"
    definition: dict[str, Any]
    parsed: Any
    fingerprint: int

    @classmethod
    def from_definition(cls, name: str, definition: Mapping[str, Any]) -> Schema:
        definition = dict(definition)
        parsed = fastavro.parse_schema(definition)
        return cls(name, definition, parsed, schema_fingerprint(parsed))

    @property
    def header(self) -> bytes:
        return MAGIC + _FINGERPRINT.pack(self.fingerprint)


class SchemaStoreUnavailable(ConnectionError):
    """The schema store could not be asked for a writer schema: retry the record later, never dead-letter it."""


@dataclass(frozen=True)
class WriterSchema:
    """A writer schema found by a resolver: its subject and its Avro definition."""

    subject: str
    definition: Mapping[str, Any]


WriterResolver = Callable[[int], WriterSchema | None]
"""Fingerprint -> the writer schema, None when unknown; raises `SchemaStoreUnavailable` when it cannot tell."""


class SchemaRepository:
    """The contracts in `schemas/avro/`: current version per subject, plus any known older writer versions, plus
    (with a `resolver`) writer versions looked up by fingerprint, at most `max_resolved` of them kept."""

    def __init__(
        self, schemas: Iterable[Schema] = (), *, resolver: WriterResolver | None = None, max_resolved: int = 256
    ) -> None:
        self.current: dict[str, Schema] = {}
        self.by_fingerprint: dict[int, Schema] = {}
        self.resolver = resolver
        self.max_resolved = max_resolved
        self._resolved: OrderedDict[int, Schema] = OrderedDict()
        for schema in schemas:
            self.add(schema)

    @classmethod
    def load(cls, directory: Path | None = None, *, resolver: WriterResolver | None = None) -> SchemaRepository:
        directory = directory or avro_schema_dir()
        files = sorted(directory.glob("*.avsc"))
        if not files:
            raise FileNotFoundError(f"no Avro schemas (*.avsc) in {directory}")
        repo = cls(resolver=resolver)
        for path in files:
            try:
                repo.add(Schema.from_definition(path.stem, json.loads(path.read_text())))
            except (ValueError, fastavro.schema.SchemaParseException) as error:
                raise ValueError(f"{path}: not a valid Avro schema: {error}") from error
        return repo

    def add(self, schema: Schema, *, current: bool = True) -> None:
        if current:
            self.current[schema.name] = schema
        self.by_fingerprint[schema.fingerprint] = schema

    def add_writer_version(self, name: str, definition: Mapping[str, Any]) -> None:
        """Register an older version that readers of `name` must still decode (from the schema registry)."""
        self.add(Schema.from_definition(name, definition), current=False)

    def writer(self, fingerprint: int) -> Schema | None:
        """The writer schema of `fingerprint`: a known one, else the resolver's answer (cached, bounded).
        Raises `SchemaStoreUnavailable` when the resolver cannot reach its store."""
        known = self.by_fingerprint.get(fingerprint)
        if known is not None:
            return known
        resolved = self._resolved.get(fingerprint)
        if resolved is not None:
            self._resolved.move_to_end(fingerprint)
            return resolved
        if self.resolver is None:
            return None
        found = self.resolver(fingerprint)
        if found is None:
            return None
        schema = Schema.from_definition(found.subject, found.definition)
        if schema.fingerprint != fingerprint:
            return None  # the store's record does not hash to what it claims: not this writer
        self._resolved[fingerprint] = schema
        while len(self._resolved) > self.max_resolved:
            self._resolved.popitem(last=False)
        return schema

    def __getitem__(self, name: str) -> Schema:
        try:
            return self.current[name]
        except KeyError:
            raise KeyError(f"unknown Avro schema {name!r}; known: {sorted(self.current)}") from None


class AvroSerializer:
    """Encodes records of one schema as single-object payloads.

    Flat records go through a compiled encoder (`avro_fast`, same bytes, several times faster); anything it
    does not take, fastavro encodes or rejects with its usual error.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._header = schema.header
        self.plan = compile_plan(schema.definition)  # None: the schema's shape needs fastavro

    def __call__(self, record: Mapping[str, Any]) -> bytes:
        if self.plan is not None:
            parts = [self._header]
            append = parts.append
            try:
                for name, write in self.plan:
                    write(record[name], append)
                return b"".join(parts)
            except (TypeError, KeyError, ValueError, OverflowError, IndexError):
                pass  # fastavro decides: it encodes what it accepts (same bytes) and explains what it does not
        return self.encode_with_fastavro(record)

    def encode_with_fastavro(self, record: Mapping[str, Any]) -> bytes:
        buffer = io.BytesIO()
        buffer.write(self._header)
        fastavro.schemaless_writer(buffer, self.schema.parsed, record)
        return buffer.getvalue()


class DecodeErrorCode(StrEnum):
    EMPTY = "EMPTY_PAYLOAD"
    NOT_AVRO = "NOT_AVRO_SINGLE_OBJECT"
    UNKNOWN_SCHEMA = "UNKNOWN_WRITER_SCHEMA"
    INCOMPATIBLE_SCHEMA = "INCOMPATIBLE_WRITER_SCHEMA"
    CORRUPT = "CORRUPT_OR_TRUNCATED"
    TRAILING_BYTES = "TRAILING_BYTES"
    TOO_LARGE = "PAYLOAD_TOO_LARGE"
    INVALID_UTF8 = "INVALID_UTF8"  # a string field holds bytes that are not UTF-8 (Avro strings must be)


@dataclass(frozen=True, slots=True)
class Decoded:
    record: dict[str, Any]
    writer: Schema


@dataclass(frozen=True, slots=True)
class DecodeError:
    code: DecodeErrorCode
    message: str


class AvroDeserializer:
    """Decodes payloads of one subject into the current (reader) schema, resolving known older writers."""

    def __init__(self, repository: SchemaRepository, subject: str, max_bytes: int = 1_000_000) -> None:
        self.repository = repository
        self.reader = repository[subject]
        self.max_bytes = max_bytes
        self.fast = compile_reader(self.reader.definition)  # payloads written with the reader schema itself

    def writer_of(self, payload: bytes | None) -> Schema | DecodeError:
        """The cheap part of decoding: size, single-object marker, writer schema known and of this subject.
        Sinks that decode bodies themselves (column-wise) check only this. Raises `SchemaStoreUnavailable` when an
        unknown writer cannot be looked up (retry the record; it is not a dead letter)."""
        if not payload:
            return DecodeError(DecodeErrorCode.EMPTY, "empty payload")
        if len(payload) > self.max_bytes:
            return DecodeError(DecodeErrorCode.TOO_LARGE, f"{len(payload)} bytes > limit {self.max_bytes}")
        if len(payload) < HEADER_SIZE or payload[:2] != MAGIC:
            return DecodeError(DecodeErrorCode.NOT_AVRO, "missing the Avro single-object marker C3 01")
        (fp,) = _FINGERPRINT.unpack_from(payload, 2)
        writer = self.repository.by_fingerprint.get(fp) or self.repository.writer(fp)  # may raise: a retry
        if writer is None:
            return DecodeError(DecodeErrorCode.UNKNOWN_SCHEMA, f"writer schema fingerprint {fp:016x} is unknown")
        if writer.name != self.reader.name:
            return DecodeError(
                DecodeErrorCode.INCOMPATIBLE_SCHEMA,
                f"written as {writer.name!r}, expected {self.reader.name!r}",
            )
        return writer

    def __call__(self, payload: bytes | None) -> Decoded | DecodeError:
        writer = self.writer_of(payload)
        if isinstance(writer, DecodeError):
            return writer
        assert payload is not None  # writer_of refused empty payloads
        if writer is self.reader and self.fast is not None:
            try:
                record, end = self.fast(payload, HEADER_SIZE)
            except (EOFError, IndexError) as error:
                return DecodeError(DecodeErrorCode.CORRUPT, f"truncated: {error or 'unexpected end of data'}")
            except UnicodeDecodeError as error:
                return DecodeError(DecodeErrorCode.INVALID_UTF8, f"a string field is not UTF-8: {error}")
            except (ValueError, OverflowError, struct.error) as error:
                return DecodeError(DecodeErrorCode.CORRUPT, f"{type(error).__name__}: {error}")
            if end != len(payload):
                return DecodeError(DecodeErrorCode.TRAILING_BYTES, f"{len(payload) - end} bytes after the record")
            return Decoded(record, writer)
        body = io.BytesIO(payload)
        body.seek(HEADER_SIZE)
        try:
            if writer is self.reader:
                record = fastavro.schemaless_reader(body, writer.parsed, None)
            else:
                record = fastavro.schemaless_reader(body, writer.parsed, self.reader.parsed)
        except (EOFError, StopIteration) as error:
            return DecodeError(DecodeErrorCode.CORRUPT, f"truncated: {error or 'unexpected end of data'}")
        except UnicodeDecodeError as error:
            return DecodeError(DecodeErrorCode.INVALID_UTF8, f"a string field is not UTF-8: {error}")
        except Exception as error:  # fastavro raises many types on corrupt input (ValueError, UnicodeError, ...)
            return DecodeError(DecodeErrorCode.CORRUPT, f"{type(error).__name__}: {error}")
        if body.tell() != len(payload):
            return DecodeError(DecodeErrorCode.TRAILING_BYTES, f"{len(payload) - body.tell()} bytes after the record")
        return Decoded(record, writer)  # type: ignore[arg-type]
