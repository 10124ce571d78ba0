"""Sparsity patterns: ``N:M`` (keep N of every M consecutive input columns) or unstructured."""

from __future__ import annotations

import dataclasses

from .errors import AtvSparseError


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    ``n``/``m`` are set for N:M (keep ``n`` of every ``m``), both ``None`` for unstructured.
    ``sparsity`` is the fraction of weights removed: ``1 - n / m`` for N:M.
    """

    n: int | None
    m: int | None
    sparsity: float

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise if ``in_features`` cannot be split into whole groups of M."""
        if self.is_nm and in_features % self.m != 0:
            raise AtvSparseError(
                f"layer {name}: in_features={in_features} is not a multiple of M={self.m} for pattern {self}; "
                f"leave it dense with `skip_incompatible` or `ignore` {name}"
            )


def parse_pattern(text: str, sparsity: float | None = None) -> Pattern:
    """``"2:4"``, ``"4:8"``, any ``"N:M"`` with 0 < N < M, or ``"unstructured"`` (needs ``sparsity``)."""
    text = text.strip().lower()
    if text == "unstructured":
        s = 0.5 if sparsity is None else float(sparsity)
        check_sparsity(s)
        return Pattern(None, None, s)
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise AtvSparseError(f"pattern {text!r} is not N:M (e.g. 2:4, 4:8) or 'unstructured'") from None
    if not 0 < n < m:
        raise AtvSparseError(f"pattern {text!r}: N:M needs 0 < N < M (N weights kept of every M)")
    if sparsity is not None and abs(float(sparsity) - (1 - n / m)) > 1e-9:
        raise AtvSparseError(
            f"`sparsity` {sparsity} contradicts pattern {text} (which removes {1 - n / m:g}); drop `sparsity`"
        )
    return Pattern(n, m, 1 - n / m)


def check_sparsity(s: float) -> None:
    if not 0.0 < s < 1.0:
        raise AtvSparseError(f"sparsity {s} is outside (0, 1): give the fraction of weights to remove, e.g. 0.5")
