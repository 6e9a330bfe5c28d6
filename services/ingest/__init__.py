"""The external ingest API: gRPC `PublishEvents` in front of the `events.raw` topic (see docs/ingest-api.md).

Public API::

    from services.ingest.client import IngestClient, EventResult   # the Python client
    python -m services.ingest                                       # the server (settings: IngestSettings)
    python -m services.ingest.codegen                               # regenerate services/ingest/v1 from proto/
"""
