"""``python -m fastntk``: the same command line as the ``fastntk`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
