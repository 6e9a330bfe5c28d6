"""Snowflake loader: new Iceberg snapshots -> RAW (PUT + COPY INTO) -> STAGING, DIM_USERS and MARTS (MERGE)."""
