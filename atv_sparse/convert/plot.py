"""The per-block picture of an ATV run, like the paper's Fig. A1 (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AtvSparseError


def plot_blocks(blocks: list[dict], path: Path, title: str = "") -> Path:
    """Mean visual drift s_bar (left axis) and mean visual tokens selected K (right axis) per block.

    blocks: the ``blocks`` list of prune_report.json (entries with ``s_bar`` and ``k_mean``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise AtvSparseError("--plot needs matplotlib: pip install 'atv-sparse[plot]' (or pip install matplotlib)") from None
    rows = [b for b in blocks if "s_bar" in b]
    if not rows:
        raise AtvSparseError("--plot draws ATV's per-block drift and budget; use it with --method atv "
                             "or --calib-tokens atv / random")
    x = [b["block"] for b in rows]
    fig, left = plt.subplots(figsize=(7, 3.5), dpi=120)
    left.plot(x, [b["s_bar"] for b in rows], "o-", color="tab:blue", label="mean visual drift s_bar")
    left.set_xlabel("decoder block")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("mean visual drift s_bar", color="tab:blue")
    right = left.twinx()
    right.plot(x, [b["k_mean"] for b in rows], "s--", color="tab:orange", label="visual tokens selected (mean K)")
    right.set_ylabel("visual tokens selected (mean K)", color="tab:orange")
    if title:
        left.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
