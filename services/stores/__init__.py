"""The stores layer: opening and reading ClickHouse, Iceberg and Snowflake, for every service that needs them.

Each store's connection settings (the environment variables that say where it is and how to log in), its
client or connection, and what its readers share: the ClickHouse named queries, the Iceberg catalog and the
offsets the archiver stores in every snapshot (`iceberg_offsets`, the archiver-to-loader contract). What a
service does with a store (the sink's tables, the archiver's table creation, the loader's SQL) stays in the
service. Imports only the kit (and the contracts); services import it, never each other.

| module | store |
|---|---|
| `iceberg.py` | `CatalogSettings`, `open_catalog`, `load_table`, `identifier`, `ensure_table_bucket` |
| `iceberg_offsets.py` | the `lp.*` snapshot properties: `snapshot_offsets`, `snapshot_topic_ids` |
| `clickhouse.py` | `ClickHouseSettings`, `ChdbClient`/`NativeClient`, `make_client`, `run_query`/`QueryFailed` |
| `clickhouse_queries.py` | the named read-only queries (live views, `daily`, `counts`) |
| `snowflake.py` | `SnowflakeSettings`, `connect`, `Warehouse`, `open_warehouse`, `CredentialError` |
"""
