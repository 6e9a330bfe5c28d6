"""``python -m services.operator`` (``lp-operator``): the kopf operator in one process.

Configuration is read and validated first (a wrong variable exits 2 naming it); then kopf runs with its
liveness endpoint on ``HTTP_PORT`` (``/healthz``) and Prometheus metrics on ``OPERATOR_METRICS_PORT``. It
connects with the pod's service account, else ``KUBECONFIG``. SIGTERM stops it cleanly (exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client import start_http_server

from services.kit.config import ConfigError, load_settings
from services.kit.exits import ExitCode
from services.kit.kafka import client_config
from services.kit.logs import configure_logging
from services.operator.settings import OperatorConfig


def main() -> int:
    try:
        config = load_settings(OperatorConfig)
    except ConfigError:
        return ExitCode.CONFIG
    configure_logging(config.service_name, config.log_level, config.log_format)
    # kopf is imported only now: it reads KUBECONFIG and friends when first imported.
    import kopf

    from services.operator.handlers import build_registry
    from services.operator.reconcile import Reconciler

    kafka = client_config(config, client_id="lp-operator")
    reconciler = Reconciler(
        kafka, timeout=config.operator_kafka_timeout_s, cap_replication_factor=config.operator_cap_replication_factor
    )
    metrics_server, _ = start_http_server(config.operator_metrics_port)
    log = logging.getLogger("services.operator")
    log.info(
        "operator starting: namespaces=%s peering=%s metrics port=%d liveness port=%d",
        config.namespaces or "all",
        config.operator_peering or "standalone",
        metrics_server.server_port,
        config.http_port,
    )
    asyncio.run(
        kopf.operator(
            registry=build_registry(config, reconciler),
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
            standalone=not config.operator_peering,
            peering_name=config.operator_peering or None,
            liveness_endpoint=f"http://0.0.0.0:{config.http_port}/healthz",
        )
    )
    metrics_server.shutdown()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
