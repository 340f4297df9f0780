"""``python -m jem_core``: see :mod:`jem_core.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
