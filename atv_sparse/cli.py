"""What the package's command lines share."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (no usage dump), exit code 2, like the
    ``error: ...`` lines of the package's own errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
