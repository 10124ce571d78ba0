"""What a command line reports of its own run, shared by ``convert`` and ``import_ct``: sizes in
human units and the process's peak resident memory. (What convert records and prints beside the
weights is ``convert/reports.py``.)"""

from __future__ import annotations


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000


def peak_rss_bytes() -> int:
    """The largest resident set this process has had so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
