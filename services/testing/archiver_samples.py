"""Archiver tables filled with sample events through the archiver's own committer (the path the archiver takes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.archiver.committer import TableCommitter
from services.archiver.rows import AvroRowBuilder, RecordColumns
from services.archiver.schemas import arrow_schema
from services.kit.avro import SchemaRepository

if TYPE_CHECKING:
    from pyiceberg.table import Table


def commit_samples(
    table: Table,
    repository: SchemaRepository,
    payloads: Sequence[bytes],
    commits: int,
    per_commit: int,
    committer: TableCommitter | None = None,
    topic: str = "events.processed",
) -> TableCommitter:
    """Commit `commits` snapshots of `per_commit` processed events each into `table` (an archiver's user_events),
    from partition 0 of `topic`, continuing at the committer's stored offset; `payloads` are cycled."""
    builder = AvroRowBuilder(repository, "processed_event", arrow_schema(table.schema()))
    committer = committer or TableCommitter(table)
    committer.claim([(topic, 0)])
    start = committer.expected[(topic, 0)] or 0
    for n in range(commits):
        columns = RecordColumns()
        for offset in range(start + n * per_commit, start + (n + 1) * per_commit):
            columns.append(topic, 0, offset, None, None, payloads[offset % len(payloads)], None)
        rows, _ = builder.build(columns)
        committer.add(rows, columns.consumed())
        committer.commit()
    return committer
