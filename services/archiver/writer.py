"""Arrow rows to Parquet data files of a table, and snapshots made of data files.

pyiceberg's `Table.append` partitions with `pyiceberg-core` (a Rust extension) as soon as a spec has a
non-identity transform such as `day(event_time)`, and it writes the files again on every commit attempt.
The archiver partitions itself instead (day and identity transforms in Arrow, one sort per batch), writes
the files once with pyiceberg's own Parquet writer (`write_file`: statistics, field ids, the table's
properties), and commits them with a fast-append snapshot. A retried commit reuses the same files, and files
of a commit that will never happen (fenced) are deleted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from itertools import count, pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.io.pyarrow import bin_pack_arrow_table, pyarrow_to_schema, write_file
from pyiceberg.manifest import DataFile
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import DateType, TimestampType, TimestamptzType
from pyiceberg.utils.properties import property_as_int

log = logging.getLogger(__name__)

MICROS_PER_DAY = 86_400_000_000


class UnsupportedPartitioning(ValueError):
    """A partition transform the archiver does not compute (only day and identity)."""


def _transformed(metadata: TableMetadata, rows: pa.Table) -> list[tuple[np.ndarray, list[object]]]:
    """Per partition field: an int code per row and the partition value of each code."""
    schema = metadata.schema()
    out: list[tuple[np.ndarray, list[object]]] = []
    for partition_field in metadata.spec().fields:
        source = schema.find_field(partition_field.source_id)
        column = (
            rows[source.name].combine_chunks() if rows.num_rows else pa.array([], rows.schema.field(source.name).type)
        )
        transform = partition_field.transform
        if isinstance(transform, DayTransform) and isinstance(source.field_type, (TimestampType, TimestamptzType)):
            micros = pc.cast(column.cast(pa.timestamp("us", tz=getattr(column.type, "tz", None))), pa.int64())
            values = pa.array(np.floor_divide(micros.fill_null(0).to_numpy(), MICROS_PER_DAY), pa.int64())
            values = pc.if_else(pc.is_null(micros), pa.scalar(None, pa.int64()), values)
        elif isinstance(transform, DayTransform) and isinstance(source.field_type, DateType):
            values = pc.cast(column, pa.int32()).cast(pa.int64())
        elif isinstance(transform, IdentityTransform):
            values = column
        else:
            raise UnsupportedPartitioning(f"partition transform {transform} on {source.name}")
        encoded = pc.dictionary_encode(values, null_encoding="encode")
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        out.append((codes, encoded.dictionary.to_pylist()))
    return out


def partition_rows(metadata: TableMetadata, rows: pa.Table) -> list[tuple[PartitionKey | None, pa.Table]]:
    """Split `rows` by the table's partition spec: one (key, rows) per partition, each partition contiguous."""
    spec = metadata.spec()
    if spec.is_unpartitioned() or rows.num_rows == 0:
        return [(None, rows)] if rows.num_rows else []
    fields = _transformed(metadata, rows)
    composite = np.zeros(rows.num_rows, np.int64)
    for codes, dictionary in fields:
        composite = composite * (len(dictionary) + 1) + codes
    order = np.argsort(composite, kind="stable")
    ordered = composite[order]
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(ordered)) + 1, [len(ordered)]))
    sorted_rows = rows.take(pa.array(order))
    schema = metadata.schema()
    parts = []
    for start, stop in pairwise(bounds):
        first = order[start]
        key = PartitionKey(
            field_values=[
                PartitionFieldValue(field=partition_field, value=dictionary[codes[first]])
                for partition_field, (codes, dictionary) in zip(spec.fields, fields, strict=True)
            ],
            partition_spec=spec,
            schema=schema,
        )
        parts.append((key, sorted_rows.slice(start, stop - start)))
    return parts


def write_data_files(table: Table, rows: pa.Table, write_uuid: uuid.UUID | None = None) -> list[DataFile]:
    """Write `rows` as Parquet data files of `table` (not committed yet): few files, up to the target size each."""
    if rows.num_rows == 0:
        return []
    metadata = table.metadata
    target = property_as_int(
        metadata.properties,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
        TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
    )
    task_schema = pyarrow_to_schema(rows.schema, name_mapping=metadata.schema().name_mapping)
    write_uuid = write_uuid or uuid.uuid4()
    counter = count()
    tasks = (
        WriteTask(
            write_uuid=write_uuid,
            task_id=next(counter),
            record_batches=batches,
            partition_key=key,
            schema=task_schema,
        )
        for key, part in partition_rows(metadata, rows)
        for batches in bin_pack_arrow_table(part, target)  # type: ignore[arg-type]
    )
    return list(write_file(io=table.io, table_metadata=metadata, tasks=tasks))


def commit_files(
    table: Table,
    added: Iterable[DataFile],
    properties: Mapping[str, str],
    removed: Iterable[DataFile] = (),
) -> Table:
    """One snapshot adding `added` (and removing `removed`: a rewrite) on the table's current metadata.

    Raises pyiceberg's CommitFailedException when another writer committed since `table` was loaded.
    """
    removed = list(removed)
    transaction = table.transaction()
    update = transaction.update_snapshot(snapshot_properties=dict(properties))
    producer = update.overwrite() if removed else update.fast_append()
    with producer as snapshot:
        for data_file in removed:
            snapshot.delete_data_file(data_file)
        for data_file in added:
            snapshot.append_data_file(data_file)
    return transaction.commit_transaction()


def delete_files(table: Table, files: Iterable[DataFile]) -> None:
    """Best effort: data files of a commit that will never happen."""
    for data_file in files:
        try:
            table.io.delete(data_file.file_path)
        except Exception as error:  # an orphan file costs storage, not correctness
            log.warning("could not delete unused data file %s: %s", data_file.file_path, error)
