"""What crosses the wire between the services: the contracts every producer and consumer must agree on.

- `topics`: topic names, the `.retry` / `.dlq` suffixes and the helpers that derive one topic from another;
- `headers`: Kafka header names (`lp-dlq-*`, `lp-retry-*`, `lp-replay-*`, `lp-cdc-*`, trace context, ...);
- `deadletter`: the dead-letter record, with the one builder and the one parser of its `lp-dlq-*` headers;
- `envelope`: the Debezium change-event envelope of the `cdc.postgres.<table>` topics.

Payload schemas are the Avro files under schemas/avro (read by `services.kit.avro`). This layer imports only the
kit; every service may import it, and no service needs another service to speak to it.
"""
