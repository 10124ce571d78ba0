"""What the package's command lines share."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (no usage dump), exit code 2, like the
    ``error: ...`` lines of the package's own errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's dest -> the flag that sets it (its last spelling), for messages that name flags."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
