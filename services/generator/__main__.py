"""`python -m services.generator`: run the generator service with settings from the environment."""

import sys

from services.generator.app import Generator, GeneratorSettings
from services.kit.service import main_for


def main() -> int:
    return main_for(Generator, GeneratorSettings)


if __name__ == "__main__":
    sys.exit(main())
