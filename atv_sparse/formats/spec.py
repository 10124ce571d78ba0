"""The ``quantization_config`` block that marks a directory as an atv-sparse checkpoint (docs/design.md 6)."""

from __future__ import annotations

from ..errors import AtvSparseError
from ..patterns import Pattern, parse_pattern

QUANT_METHOD = "atv_sparse"
FORMAT_VERSION = 1
FORMAT_NAME = "bitmask"


def build_quantization_config(pattern: Pattern, method: str, method_settings: dict, targets: list[str],
                              ignore: list[str], library_version: str) -> dict:
    """The dict written under config.json's ``quantization_config``."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "pattern": str(pattern),
        "sparsity": pattern.sparsity,
        "method": method,
        "method_settings": method_settings,
        "targets": list(targets),
        "ignore": list(ignore),
        "version": library_version,
    }


def check_quantization_config(block: dict, where: str) -> Pattern:
    """Validate a ``quantization_config`` block read from ``where``; return its pattern."""
    if block.get("quant_method") != QUANT_METHOD:
        raise AtvSparseError(f"{where}: quantization_config.quant_method is {block.get('quant_method')!r}, "
                             f"not {QUANT_METHOD!r}")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise AtvSparseError(f"{where}: atv_sparse checkpoint format version {version!r} is not supported by "
                             f"this atv_sparse (it reads version {FORMAT_VERSION}); upgrade atv_sparse")
    if block.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise AtvSparseError(f"{where}: unknown atv_sparse format {block.get('format')!r}")
    try:
        return parse_pattern(str(block.get("pattern")), block.get("sparsity") if block.get("pattern") ==
                             "unstructured" else None)
    except AtvSparseError as e:
        raise AtvSparseError(f"{where}: quantization_config: {e}") from None
