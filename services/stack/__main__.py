"""``python -m services.stack up|down|status|env``."""

import sys

from services.stack.cli import main

if __name__ == "__main__":
    sys.exit(main())
