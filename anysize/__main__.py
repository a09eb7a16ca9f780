"""``python -m anysize``: the command line (see :mod:`anysize.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
