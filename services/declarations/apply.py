"""Apply the declarations (``deploy/k8s``) to a Kafka cluster: the one code path local mode, the CLI and
the future kopf operator share. Order: the internal ``_lp_schemas`` topic, then schemas, then topics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka.admin import AdminClient

from services.contracts.schema_store import SchemaStoreError
from services.declarations.registry import SCHEMAS_TOPIC_SPEC, KafkaSchemaStore, SchemaIncompatibleError
from services.declarations.resources import KIND_SCHEMA, KIND_TOPIC, Declarations, load_declarations
from services.declarations.topics import TopicResult, reconcile_topics

DECLARATIONS_DIR = Path("deploy/k8s")


@dataclass(frozen=True)
class SchemaResult:
    name: str  # EventSchema resource name
    subject: str
    action: Literal["registered", "unchanged", "error"]
    message: str = ""
    version: int | None = None
    fingerprint: str | None = None
    problems: tuple[str, ...] = ()  # incompatibilities, one per line in reports

    @property
    def ok(self) -> bool:
        return self.action != "error"


@dataclass
class ApplyReport:
    internal_topics: list[TopicResult] = field(default_factory=list)
    schemas: list[SchemaResult] = field(default_factory=list)
    topics: list[TopicResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.internal_topics) and all(r.ok for r in [*self.schemas, *self.topics])

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, name, action, detail) per reconciled object, in the order they were applied."""
        rows = [(KIND_TOPIC, r.topic, r.action, r.message) for r in self.internal_topics]
        rows += [(KIND_SCHEMA, s.subject, s.action, s.message) for s in self.schemas]
        rows += [(KIND_TOPIC, r.topic, r.action, r.message) for r in self.topics]
        return rows

    def table(self) -> str:
        header = ("KIND", "NAME", "RESULT", "DETAIL")
        rows = self.rows()
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        lines = []
        for row in [header, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
            lines.append("  ".join([*cells, row[3]]))
        for schema in self.schemas:
            lines += [f"    {schema.subject}: {problem}" for problem in schema.problems]
        return "\n".join(line.rstrip() for line in lines)

    __str__ = table


def declarations_dir(root: Path) -> Path:
    """``root`` may be the repository root or the declarations directory itself."""
    nested = root / DECLARATIONS_DIR
    return nested if nested.is_dir() else root


def apply_declarations(
    root: Path,
    bootstrap_servers: str,
    *,
    timeout: float = 30.0,
    cap_replication_factor: bool = False,
    client_config: Mapping[str, Any] | None = None,
) -> ApplyReport:
    """Load the declarations under ``root``, register their schemas and reconcile their topics.

    Raises ``resources.DeclarationError`` when the declarations themselves are invalid (nothing is
    applied then). Per-object failures (an incompatible schema, an impossible partition change, an
    unreachable broker) are reported in the returned ``ApplyReport``; check ``report.ok``.
    ``cap_replication_factor`` is for single-broker dev clusters (see ``topics.reconcile_topics``).
    """
    declarations = load_declarations(declarations_dir(root))
    config = {"bootstrap.servers": bootstrap_servers, **(client_config or {})}
    admin = AdminClient(config)
    report = ApplyReport()
    report.internal_topics = reconcile_topics(
        admin, [SCHEMAS_TOPIC_SPEC], timeout=timeout, cap_replication_factor=cap_replication_factor
    )
    if report.ok:
        store = KafkaSchemaStore(bootstrap_servers, timeout=timeout, client_config=client_config)
        report.schemas = register_schemas(store, declarations)
    else:
        report.schemas = [
            SchemaResult(s.name, s.subject, "error", "schema store topic unavailable") for s in declarations.schemas
        ]
    report.topics = reconcile_topics(
        admin, declarations.topics, timeout=timeout, cap_replication_factor=cap_replication_factor
    )
    return report


def register_schemas(store: KafkaSchemaStore, declarations: Declarations) -> list[SchemaResult]:
    try:
        history = store.read_all()  # once for all subjects: each read scans the whole topic
    except SchemaStoreError as error:
        return [SchemaResult(s.name, s.subject, "error", str(error)) for s in declarations.schemas]
    results = []
    for spec in declarations.schemas:
        try:
            registered = store.register(
                spec.subject, spec.schema, spec.compatibility, history=history.get(spec.subject, [])
            )
        except SchemaIncompatibleError as error:
            results.append(
                SchemaResult(
                    spec.name,
                    spec.subject,
                    "error",
                    f"refused: not {error.mode.value} compatible ({len(error.problems)} problem(s))",
                    problems=tuple(str(problem) for problem in error.problems),
                )
            )
            continue
        except SchemaStoreError as error:
            results.append(SchemaResult(spec.name, spec.subject, "error", str(error)))
            continue
        results.append(
            SchemaResult(
                spec.name,
                spec.subject,
                "registered" if registered.registered else "unchanged",
                f"version {registered.version}, {spec.compatibility.value}, fingerprint {registered.fingerprint}",
                version=registered.version,
                fingerprint=registered.fingerprint,
            )
        )
    return results
