"""Change data capture: PostgreSQL (users, products, transactions) to Kafka `cdc.postgres.<table>` topics.

Locally through the Debezium embedded engine (`python -m services.cdc`), in Kubernetes through Debezium Server;
both configured from deploy/debezium/postgres-connector.properties. See docs/cdc.md.
"""
