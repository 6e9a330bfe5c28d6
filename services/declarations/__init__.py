"""The declarations library: the KafkaTopic / EventSchema custom resources of ``deploy/k8s``.

Loads and validates them (``resources``), applies them to a broker (``apply``: topics, and the schema
versions in the ``_lp_schemas`` topic), checks Avro compatibility (``avro_compat``, ``schema_check``) and
generates the EventSchema manifests from ``schemas/avro`` (``manifests``). Local mode and the CLI
(``python -m services.declarations``, ``lp-declarations``) and the kopf operator (``services.operator``) that
reconciles the resources in Kubernetes share it. Imports nothing of ours but the kit and the contracts.
"""
