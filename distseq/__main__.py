"""``python -m distseq`` (and ``torchrun -m distseq``) runs the ``distseq`` command."""

import sys

from distseq.cli import main

if __name__ == "__main__":
    sys.exit(main())
