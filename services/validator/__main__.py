"""`python -m services.validator` runs the validator service; `replay` and `load` are its tools (cli.py).

python -m services.validator            # the streaming service (stream_app.run with processor.make_processor)
python -m services.validator replay ... # dead letters back to their original topic
python -m services.validator load F...  # batch files through the same processor path
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from services.kit.config import load_settings
from services.kit.exits import ExitCode
from services.kit.kafka import client_config, wait_for_broker
from services.kit.logs import configure_logging
from services.validator import processor, stream_app
from services.validator.runtime import TopicsMissing

log = logging.getLogger("services.validator")


def serve() -> int:
    os.environ.setdefault("OUTPUT_TOPICS", ",".join(processor.output_topics()))
    settings = load_settings(processor.ValidatorSettings)
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    for chatty in ("faust", "mode"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        # The broker first: the processor reads users/products from it, and one line names it if it is not there.
        wait_for_broker(client_config(settings), settings.dependency_wait_s)
        return stream_app.run(settings, processor.make_processor(settings))  # reads users/products to their end first
    except (TopicsMissing, ConnectionError) as error:
        log.error("cannot start: %s", error)
        return ExitCode.FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("replay", "load"):
        from services.validator import cli

        return cli.main(args)
    if args:
        print(__doc__, file=sys.stderr)
        return ExitCode.CONFIG
    return serve()


if __name__ == "__main__":
    sys.exit(main())
