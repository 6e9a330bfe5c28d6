"""The Iceberg archiver (batch layer): Kafka -> Iceberg tables on S3, exactly once; maintenance, time travel,
replay. `python -m services.archiver --help`; docs/archiver.md."""
