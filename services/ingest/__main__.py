"""`python -m services.ingest`: serve the gRPC ingest API with settings from the environment."""

import sys

from services.ingest.app import IngestService, IngestSettings
from services.kit.service import main_for


def main() -> int:
    return main_for(IngestService, IngestSettings)


if __name__ == "__main__":
    sys.exit(main())
