"""The Avro contracts of the CDC topics (schemas/avro/cdc_*.avsc) describe the JSON Debezium really writes.

`sample_envelopes.json` holds envelopes captured from the real embedded engine against PostgreSQL 18 (snapshot
read, insert, update and delete), byte for byte as they were produced to Kafka.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.validation import ValidationError, validate

REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLES = json.loads((Path(__file__).with_name("sample_envelopes.json")).read_text())
TABLES = ("users", "products", "transactions")


def contract(table: str) -> Any:
    return fastavro.parse_schema(json.loads((REPO_ROOT / f"schemas/avro/cdc_{table}.avsc").read_text()))


def table_of(sample: dict[str, str]) -> str:
    return sample["topic"].rsplit(".", 1)[1]


def test_samples_cover_every_table_and_op() -> None:
    covered = {(table_of(s), json.loads(s["value"])["op"]) for s in SAMPLES}
    assert {op for table, op in covered if table == "users"} >= {"c", "u", "d"}
    assert {op for table, op in covered if table == "products"} >= {"r", "c", "u"}
    assert {op for table, op in covered if table == "transactions"} >= {"c", "u", "d"}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: f"{table_of(s)}-{json.loads(s['value'])['op']}")
def test_real_envelopes_validate_against_their_contract(sample: dict[str, str]) -> None:
    envelope = json.loads(sample["value"])
    schema = contract(table_of(sample))
    assert validate(envelope, schema)
    assert validate(envelope, schema, strict=True)  # and no field the contract does not declare


@pytest.mark.parametrize("sample", SAMPLES[:1])
def test_the_documented_conversions_are_what_the_contract_checks(sample: dict[str, str]) -> None:
    """numeric is a string (decimal.handling.mode=string); a number or base64 bytes would break the contract."""
    envelope = json.loads(sample["value"])
    assert table_of(sample) == "products"
    assert re.fullmatch(r"\d+\.\d\d", envelope["after"]["price"])
    broken = copy.deepcopy(envelope)
    broken["after"]["price"] = 12.5
    with pytest.raises(ValidationError):
        validate(broken, contract("products"))


def test_keys_are_the_primary_key_as_json() -> None:
    for sample in SAMPLES:
        key = json.loads(sample["key"])
        envelope = json.loads(sample["value"])
        row = envelope["after"] or envelope["before"]
        (column,) = key
        assert key[column] == row[column]
        assert (
            column == {"users": "user_id", "products": "product_id", "transactions": "transaction_id"}[table_of(sample)]
        )


def test_source_carries_what_downstream_dedupes_on() -> None:
    for sample in SAMPLES:
        source = json.loads(sample["value"])["source"]
        assert isinstance(source["lsn"], int) and isinstance(source["txId"], int) and isinstance(source["ts_ms"], int)
        assert source["table"] == table_of(sample) and source["snapshot"] in ("true", "false", "first", "last")


def oltp_columns() -> dict[str, list[str]]:
    """Column names per table, in order, from schemas/postgres/oltp.sql."""
    ddl = (REPO_ROOT / "schemas/postgres/oltp.sql").read_text()
    tables = {}
    for name, body in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\n\);", ddl, flags=re.S):
        # Column lines start with a lower-case name; continuation lines (CHECK ...) with an upper-case keyword.
        tables[name] = [line.split()[0] for line in body.splitlines() if re.match(r"\s*[a-z_]+\s", line)]
    return tables


@pytest.mark.parametrize("table", TABLES)
def test_row_records_have_the_table_columns(table: str) -> None:
    schema = json.loads((REPO_ROOT / f"schemas/avro/cdc_{table}.avsc").read_text())
    before = next(f for f in schema["fields"] if f["name"] == "before")
    row = next(branch for branch in before["type"] if isinstance(branch, dict))
    assert [f["name"] for f in row["fields"]] == oltp_columns()[table]
    after = next(f for f in schema["fields"] if f["name"] == "after")
    assert after["type"] == ["null", row["name"]]
    source = next(f for f in schema["fields"] if f["name"] == "source")["type"]
    assert {"lsn", "txId", "ts_ms", "snapshot", "table"} <= {f["name"] for f in source["fields"]}
