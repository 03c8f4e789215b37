"""``python -m kfac_lab`` = the ``kfac-lab`` command (see :mod:`kfac_lab.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
