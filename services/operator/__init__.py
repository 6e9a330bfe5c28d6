"""The kopf operator: KafkaTopic and EventSchema resources reconciled with Kafka and the ``_lp_schemas`` store.

``reconcile`` holds the Kafka-side work over the declarations library (the code path ``make run``'s local apply
shares), ``handlers`` the kopf handlers, status and Events, ``settings`` the configuration, ``__main__`` the
process (kopf's liveness ``/healthz``, Prometheus ``/metrics``). See docs/operator.md.
"""
