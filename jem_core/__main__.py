"""``python -m jem_core``: the entry point only; the commands and their parsing live in :mod:`jem_core.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
