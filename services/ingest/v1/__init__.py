"""Generated code of the ingest API (proto/lambda_pipeline/ingest/v1/ingest.proto).

Do not edit `ingest_pb2*.py*` by hand: `python -m services.ingest.codegen` regenerates them.
"""
