"""What the archiver stores in every Iceberg snapshot it commits, read back by whoever continues from it.

The archiver-to-loader contract: each snapshot summary carries `lp.offsets` = {"topic:partition": next Kafka
offset} for every partition ever archived into the table (rows before those offsets are in the table, rows
from there on are not) and `lp.topic-ids` = {"topic": Kafka topic id} (a re-created topic starts again at 0).
The archiver writes them with the rows in one atomic commit and resumes from them; the Snowflake loader reads
them to find the rows new since its last load. `lp.committer`, `lp.commit-id` and `lp.rows` say which
committer wrote a snapshot, the commit it was (to resolve an unknown outcome) and how many rows it added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

OFFSETS_PROPERTY = "lp.offsets"
TOPIC_IDS_PROPERTY = "lp.topic-ids"  # {"topic": Kafka topic id}: a re-created topic starts again at 0
COMMITTER_PROPERTY = "lp.committer"
COMMIT_ID_PROPERTY = "lp.commit-id"
ROWS_PROPERTY = "lp.rows"

TopicPartition = tuple[str, int]


def encode_offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return json.dumps({f"{topic}:{partition}": offset for (topic, partition), offset in sorted(offsets.items())})


def decode_offsets(text: str) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for key, offset in json.loads(text).items():
        topic, _, partition = key.rpartition(":")
        out[(topic, int(partition))] = int(offset)
    return out


def _nearest_property(table: Table, snapshot: Snapshot | None, name: str) -> str | None:
    """`name` of `snapshot` (default: the current one) or of its nearest ancestor that has it."""
    snapshot = snapshot if snapshot is not None else table.current_snapshot()
    while snapshot is not None:
        text = snapshot.summary.additional_properties.get(name) if snapshot.summary else None
        if text is not None:
            return text
        if snapshot.parent_snapshot_id is None:
            break
        snapshot = table.snapshot_by_id(snapshot.parent_snapshot_id)
    return None


def snapshot_topic_ids(table: Table, snapshot: Snapshot | None = None) -> dict[str, str]:
    """The Kafka topic ids the offsets stored with `snapshot` belong to (a re-created topic starts again at 0)."""
    text = _nearest_property(table, snapshot, TOPIC_IDS_PROPERTY)
    return dict(json.loads(text)) if text is not None else {}


def snapshot_offsets(table: Table, snapshot: Snapshot | None = None) -> dict[TopicPartition, int]:
    """The offsets stored with `snapshot` (default: the current one), from the nearest ancestor that has them.

    Compaction copies them forward, so this is normally the snapshot itself; the walk covers snapshots other
    tools made (a delete from a notebook) that do not know about `lp.offsets`.
    """
    text = _nearest_property(table, snapshot, OFFSETS_PROPERTY)
    return decode_offsets(text) if text is not None else {}
