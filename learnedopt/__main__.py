"""``python -m learnedopt``: the command line (:mod:`learnedopt.cli`; also the ``learnedopt`` command)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
