"""The Debezium connector property set: load it, resolve its placeholders, route topics, render it for Debezium Server.

`deploy/debezium/postgres-connector.properties` is the single source of the connector's configuration. The local
runner resolves its `${NAME}` / `${NAME:default}` placeholders itself (the same syntax Quarkus resolves in Debezium
Server) and overlays what only the local runtime has (the file offset store). `server_properties` renders the same
keys as Debezium Server's `application.properties`, so both runtimes capture, format and route identically.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from services.contracts.topics import CDC_OFFSETS
from services.kit.paths import repo_root

ROUTER_TYPE = "org.apache.kafka.connect.transforms.RegexRouter"
FILE_OFFSET_STORE = "org.apache.kafka.connect.storage.FileOffsetBackingStore"
KAFKA_OFFSET_STORE = "org.apache.kafka.connect.storage.KafkaOffsetBackingStore"
# The engine's name is part of every stored offset key: fixed, so renaming the service never loses offsets.
LOCAL_ENGINE_NAME = "lp-cdc"
HEARTBEAT_TABLE = "public.debezium_heartbeat"

_PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.]*)(?::([^}]*))?\}")


class ConnectorConfigError(ValueError):
    """The property set cannot be used as given (missing placeholder value, unreadable file, bad routing)."""


def default_properties_path() -> Path:
    return repo_root() / "deploy" / "debezium" / "postgres-connector.properties"


def server_properties_path() -> Path:
    return repo_root() / "deploy" / "debezium" / "application.properties"


# --- java.util.Properties text format ---------------------------------------------------------------------------


def parse_properties(text: str) -> dict[str, str]:
    """Parse `java.util.Properties` text: comments, `=`/`:`/blank separators, continuations and escapes.

    Key order is kept (it is the file's order, which the rendered application.properties follows).
    """
    result: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].lstrip()
        index += 1
        if not line or line[0] in "#!":
            continue
        # A line ending in an odd number of backslashes continues on the next one (leading blanks dropped).
        while _continues(line) and index < len(lines):
            line = line[:-1] + lines[index].lstrip()
            index += 1
        if _continues(line):
            line = line[:-1]
        key, value = _split_entry(line)
        result[_unescape(key)] = _unescape(value)
    return result


def _continues(line: str) -> bool:
    trailing = len(line) - len(line.rstrip("\\"))
    return trailing % 2 == 1


def _split_entry(line: str) -> tuple[str, str]:
    """Split like `Properties.load`: the key ends at the first unescaped `=`, `:` or blank; one separator and the
    blanks around it are skipped."""
    position = 0
    while position < len(line):
        char = line[position]
        if char == "\\":
            position += 2
            continue
        if char in "=: \t\f":
            break
        position += 1
    key = line[:position]
    has_separator = position < len(line) and line[position] in "=:"
    start = position + 1 if position < len(line) else position
    while start < len(line) and line[start] in " \t\f=:":
        if line[start] in "=:":
            if has_separator:
                break
            has_separator = True
        start += 1
    return key, line[start:]


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out: list[str] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char != "\\" or position + 1 == len(text):
            out.append(char)
            position += 1
            continue
        escaped = text[position + 1]
        if escaped == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[position + 2 : position + 6]):
            out.append(chr(int(text[position + 2 : position + 6], 16)))
            position += 6
            continue
        out.append({"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(escaped, escaped))
        position += 2
    return "".join(out)


def _escape(text: str, *, key: bool) -> str:
    out = []
    for position, char in enumerate(text):
        if char == "\\":
            out.append("\\\\")
        elif char in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[char])
        elif char in "=:#!" and key:
            out.append("\\" + char)
        elif char == " " and (key or position == 0):
            out.append("\\ ")
        else:
            out.append(char)
    return "".join(out)


def render_properties(properties: Mapping[str, str]) -> str:
    return "".join(f"{_escape(k, key=True)}={_escape(v, key=False)}\n" for k, v in properties.items())


def load_properties(path: Path | None = None) -> dict[str, str]:
    path = path or default_properties_path()
    try:
        return parse_properties(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConnectorConfigError(f"cannot read the connector properties {path}: {error.strerror}") from None


# --- placeholders -----------------------------------------------------------------------------------------------


def placeholders(properties: Mapping[str, str]) -> dict[str, str | None]:
    """Every placeholder name used, with its default (None when it has none and so is required)."""
    found: dict[str, str | None] = {}
    for value in properties.values():
        for match in _PLACEHOLDER_RE.finditer(value):
            found.setdefault(match.group(1), match.group(2))
    return found


def resolve(properties: Mapping[str, str], variables: Mapping[str, str]) -> dict[str, str]:
    """Replace `${NAME}` / `${NAME:default}` from `variables`; an unset required one is an error naming its key.

    Like Quarkus, a variable set to the empty string counts as unset (so its default applies).
    """
    missing: list[str] = []
    resolved: dict[str, str] = {}
    for key, value in properties.items():

        def substitute(match: re.Match[str], key: str = key) -> str:
            name, default = match.group(1), match.group(2)
            given = variables.get(name)
            if given not in (None, ""):
                return str(given)
            if default is not None:
                return default
            missing.append(f"{key} needs ${{{name}}}")
            return ""

        resolved[key] = _PLACEHOLDER_RE.sub(substitute, value)
    if missing:
        raise ConnectorConfigError("unresolved connector placeholders: " + "; ".join(missing))
    return resolved


# --- routing ----------------------------------------------------------------------------------------------------


def _routers(properties: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    routers = []
    for name in (n.strip() for n in properties.get("transforms", "").split(",") if n.strip()):
        prefix = f"transforms.{name}."
        kind = properties.get(prefix + "type")
        if kind != ROUTER_TYPE:
            raise ConnectorConfigError(f"transform {name!r} has type {kind!r}; only {ROUTER_TYPE} is supported here")
        try:
            pattern = re.compile(properties[prefix + "regex"])
        except (KeyError, re.error) as error:
            raise ConnectorConfigError(f"transform {name!r}: bad or missing regex: {error}") from None
        replacement = properties.get(prefix + "replacement", "")
        # Java's Matcher.replaceFirst writes groups as $1; Python's re as \g<1>.
        routers.append((pattern, re.sub(r"\$(\d+)", r"\\g<\1>", replacement.replace("\\", "\\\\"))))
    return routers


def route_topic(properties: Mapping[str, str], topic: str) -> str:
    """The topic a record Debezium names `topic` ends up in, after the RegexRouter transforms (in order).

    RegexRouter renames a topic only when the regex matches it entirely.
    """
    for pattern, replacement in _routers(properties):
        if pattern.fullmatch(topic):
            topic = pattern.sub(replacement, topic, count=1)
    return topic


def captured_tables(properties: Mapping[str, str]) -> list[str]:
    """`table.include.list` as schema-qualified names (the preflight checks each one exists)."""
    tables = [t.strip() for t in properties.get("table.include.list", "").split(",") if t.strip()]
    if not tables:
        raise ConnectorConfigError("table.include.list is empty: nothing to capture")
    return tables


def table_topics(properties: Mapping[str, str]) -> dict[str, str]:
    """Captured table (schema.table) -> the Kafka topic its change events go to."""
    prefix = properties.get("topic.prefix", "")
    return {table: route_topic(properties, f"{prefix}.{table}") for table in captured_tables(properties)}


def heartbeat_topic(properties: Mapping[str, str]) -> str:
    heartbeat_prefix = properties.get("topic.heartbeat.prefix", "__debezium-heartbeat")
    return route_topic(properties, f"{heartbeat_prefix}.{properties.get('topic.prefix', '')}")


# --- the two runtimes -------------------------------------------------------------------------------------------


def local_properties(
    shared: Mapping[str, str], variables: Mapping[str, str], offsets_file: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The embedded engine's properties: the shared set resolved, plus the local file offset store."""
    properties = resolve(shared, variables)
    properties |= {
        "name": LOCAL_ENGINE_NAME,
        "offset.storage": FILE_OFFSET_STORE,
        "offset.storage.file.filename": str(offsets_file),
    }
    properties |= dict(extra or {})
    return properties


# Keys only Debezium Server has: the Kafka sink (its producer waits for every record's acknowledgement before the
# batch is marked processed, as the local runner's flush does), the JSON formats, and offsets kept in Kafka so
# the pod needs no volume.
SERVER_ONLY: tuple[tuple[str, str], ...] = (
    ("debezium.sink.type", "kafka"),
    ("debezium.sink.kafka.producer.bootstrap.servers", "${KAFKA_BOOTSTRAP_SERVERS}"),
    ("debezium.sink.kafka.producer.security.protocol", "${KAFKA_SECURITY_PROTOCOL:PLAINTEXT}"),
    ("debezium.sink.kafka.producer.key.serializer", "org.apache.kafka.common.serialization.StringSerializer"),
    ("debezium.sink.kafka.producer.value.serializer", "org.apache.kafka.common.serialization.StringSerializer"),
    ("debezium.sink.kafka.producer.enable.idempotence", "true"),
    ("debezium.sink.kafka.producer.acks", "all"),
    ("debezium.sink.kafka.producer.compression.type", "zstd"),
    ("debezium.sink.kafka.producer.linger.ms", "20"),
    ("debezium.format.key", "json"),
    ("debezium.format.value", "json"),
    ("debezium.source.offset.storage", KAFKA_OFFSET_STORE),
    ("debezium.source.offset.storage.topic", f"${{CDC_OFFSETS_TOPIC:{CDC_OFFSETS}}}"),
    ("debezium.source.offset.storage.partitions", "1"),
    ("debezium.source.offset.storage.replication.factor", "${CDC_OFFSETS_REPLICATION:3}"),
    ("debezium.source.bootstrap.servers", "${KAFKA_BOOTSTRAP_SERVERS}"),
    ("quarkus.log.console.json", "true"),
    ("quarkus.log.level", "INFO"),
    ("quarkus.http.port", "8080"),
)


def server_key(key: str) -> list[str]:
    """Where a shared key goes in Debezium Server's application.properties."""
    if key == "transforms" or key.startswith("transforms."):
        return [f"debezium.{key}"]
    if key.startswith("converter."):
        # The embedded engine reads converter.* for its key and value JSON converters; the server has one of each.
        rest = key.removeprefix("converter.")
        return [f"debezium.format.key.{rest}", f"debezium.format.value.{rest}"]
    return [f"debezium.source.{key}"]


def server_properties(shared_text: str) -> str:
    """Debezium Server's application.properties (text) for the shared property set (text): placeholders kept,
    Quarkus resolves them from the container's environment."""
    shared = parse_properties(shared_text)
    entries: list[tuple[str, str]] = []
    for key, value in shared.items():
        entries.extend((target, value) for target in server_key(key))
    server_keys = {k for k, _ in SERVER_ONLY}
    clash = server_keys & {k for k, _ in entries}
    if clash:
        raise ConnectorConfigError(f"the shared property set must not set server-only keys: {sorted(clash)}")
    header = (
        "# GENERATED from deploy/debezium/postgres-connector.properties by\n"
        "# `python -m services.cdc server-properties`: edit that file (or SERVER_ONLY in services/cdc/connector.py).\n"
        "# Debezium Server (quay.io/debezium/server) configuration; ${NAME[:default]} come from the environment.\n"
    )
    return (
        header
        + "\n# --- shared connector property set ---\n"
        + render_properties(dict(entries))
        + "\n# --- Debezium Server only: Kafka sink, JSON format, offsets in Kafka, logging ---\n"
        + render_properties(dict(SERVER_ONLY))
    )


def normalize_tables(tables: Iterable[str], default_schema: str = "public") -> list[str]:
    """`users` -> `public.users`; already qualified names are kept."""
    return [t if "." in t else f"{default_schema}.{t}" for t in (t.strip() for t in tables) if t]
