"""``python -m pbs2p ...`` runs the ``pbs2p`` command line (see :mod:`pbs2p.cli`)."""

import sys

from pbs2p.cli import main

if __name__ == "__main__":
    sys.exit(main())
