"""The validator / enricher: pure, synchronous core (the Faust app wraps it).

- `rulebook`: rules/*.yaml -> validated, compiled, reloadable `RuleBook` (`expressions`: the safe language)
- `engine`: `RuleEngine.evaluate(record, kind) -> Verdict` (accept / reject / retry), per-rule counters
- `references`, `cdc`: reference data from Debezium envelopes, idempotent on replays
- `enrich`, `outputs`: enrichment, e-mail hashing, output records for the Avro contracts
- `retry`: the late-reference policy; `dedupe`: bounded in-memory DUPLICATE_ALLOW_ONE memory
- `rejections`: the validator's refusals as dead letters (the format is `services.contracts.deadletter`)
- `batch`: CSV / JSON Lines / Parquet readers
- `pipeline`: one consumed message in, the messages to produce out; `processor`: the pipeline for every input
  topic, as the streaming runtime's processor (`runtime`, `stream_app`); `cli`: the replay and load tools

See docs/validation.md.
"""
