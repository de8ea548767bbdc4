"""``python -m pbs2p_lab ...`` runs the ``pbs2p`` command line (see :mod:`pbs2p_lab.cli`)."""

import sys

from pbs2p_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
