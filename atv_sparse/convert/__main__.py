"""``python -m atv_sparse.convert``: the command line of ``convert.cli``."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (pkgutil.walk_packages) runs nothing
    sys.exit(main())
