"""The validator / enricher: pure, synchronous core (the Faust app wraps it).

- `rulebook`: rules/*.yaml -> validated, reloadable `RuleBook`, each rule compiled to a column check
  (`expressions`: the safe language and its interpreter; `columns`: rules and expressions over Arrow batches)
- `engine`: `RuleEngine.evaluate_batch(table, kind) -> [Verdict]` (accept / reject / retry), per-rule counters
- `splice`: processed_event payloads from the raw payloads' bytes and per-value blocks
- `references`, `cdc`: reference data from Debezium envelopes, idempotent on replays
- `enrich`, `outputs`: enrichment, e-mail hashing, output records for the Avro contracts
- `retry`: the late-reference policy; `dedupe`: bounded in-memory DUPLICATE_ALLOW_ONE memory
- `rejections`: the validator's refusals as dead letters (the format is `services.contracts.deadletter`)
- `batch`: CSV / JSON Lines / Parquet / Avro file readers (judged by the same engine, in batches)
- `pipeline`: a batch of consumed messages in, the messages to produce out; `processor`: the pipeline for every input
  topic, as the streaming runtime's processor (`runtime`, `stream_app`); `cli`: the replay and load tools

See docs/validation.md.
"""
