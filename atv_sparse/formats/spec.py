"""The ``quantization_config`` block that marks a directory as an atv-sparse checkpoint (docs/design.md 6).

``QuantizationBlock`` is the one type for it: ``QuantizationBlock.parse`` runs the one strict
validator (``check_quantization_config``) that every reader runs before any tensor is read
(``atv_sparse.load``, the transformers quantizer, the vLLM plugin), ``to_dict`` gives the block
back, and ``build_quantization_config`` is the block the writer writes. The transformers and vLLM
config classes are adapters that hold a ``QuantizationBlock``. The schema of format version 1,
key by key:

==================  ========  =================================================================
key                 needed    form
==================  ========  =================================================================
quant_method        yes       ``"atv_sparse"``
format_version      yes       the integer ``1``
pattern             yes       ``"N:M"`` with 0 < N < M <= 1024, or ``"unstructured"``
sparsity            unstr.    a number in (0, 1); for N:M optional and equal to 1 - N / M
format              no        ``"bitmask"``
method              no        a name such as ``"wanda"`` (lower case, digits, ``_`` / ``-``)
method_settings     no        a JSON object (recorded for people, never read by a loader)
targets             no        a non-empty list of module names, class names or ``re:`` regexes
ignore              no        a list of the same (may be empty)
version             no        the atv_sparse version that wrote it, e.g. ``"0.1.0"``
==================  ========  =================================================================

Any other key, a value of another type or out of range is refused with one ``AtvSparseError``
naming the file, the key and the expected form: a block nobody can vouch for never loads
(a ``targets`` string would be iterated character by character, a ``sparsity`` of 1.5 would
be believed). The keys the writer does not always write stay optional so that hand-written
blocks that were valid before this schema still load.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ..errors import AtvSparseError
from ..patterns import Pattern, parse_pattern

QUANT_METHOD = "atv_sparse"
FORMAT_VERSION = 1
FORMAT_NAME = "bitmask"

_NM = re.compile(r"([1-9][0-9]{0,3}):([1-9][0-9]{0,3})")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"[0-9A-Za-z.+_-]{1,64}")
# A targets / ignore entry longer than this is not a module name anyone wrote by hand; the cap also
# keeps re.compile away from patterns big enough to take noticeable time.
MAX_ENTRY_CHARS = 1024
MAX_ENTRIES = 4096
_HINT = "fix config.json or re-run atv_sparse.convert"


# Keys a block may lack.
_OPTIONAL_KEYS = ("format", "sparsity", "method", "method_settings", "targets", "ignore", "version")


@dataclasses.dataclass(frozen=True)
class QuantizationBlock:
    """A validated ``quantization_config`` block (the schema above as a type).

    An optional key the block did not have is None here and stays absent in ``to_dict``, so a
    hand-written block round-trips unchanged. targets / ignore: tuples of the entries.
    """

    pattern: Pattern
    format_version: int = FORMAT_VERSION
    format: str | None = None
    sparsity: float | None = None
    method: str | None = None
    method_settings: dict | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    version: str | None = None

    @classmethod
    def parse(cls, block: dict, where: str, prefix: str = "quantization_config") -> "QuantizationBlock":
        """Validate ``block`` read from ``where`` (``check_quantization_config``) and hold it."""
        pattern = check_quantization_config(block, where, prefix)
        fields = {k: tuple(block[k]) if k in ("targets", "ignore") else block[k] for k in _OPTIONAL_KEYS if k in block}
        return cls(pattern, block["format_version"], **fields)

    def to_dict(self) -> dict:
        """The block as config.json holds it."""
        block = {"quant_method": QUANT_METHOD}
        for key in _CHECKS:  # the schema's order
            value = str(self.pattern) if key == "pattern" else getattr(self, key, None)
            if value is not None:
                block[key] = list(value) if key in ("targets", "ignore") else value
        return block


def build_quantization_config(pattern: Pattern, method: str, method_settings: dict, targets: list[str],
                              ignore: list[str], library_version: str) -> dict:
    """The block the writer puts under config.json's ``quantization_config`` (every key written)."""
    return QuantizationBlock(pattern, FORMAT_VERSION, FORMAT_NAME, pattern.sparsity, method, method_settings,
                             tuple(targets), tuple(ignore), library_version).to_dict()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Block:
    """The block under check and where it came from, to phrase every refusal the same way."""

    def __init__(self, block: dict, where: str, prefix: str):
        self.block, self.where, self.prefix = block, where, prefix

    def fail(self, key: str, expected: str) -> AtvSparseError:
        found = f"found {_short(self.block[key])}" if key in self.block else "it is missing"
        return AtvSparseError(f"{self.where}: {self.prefix}.{key}: expected {expected}, {found}; {_HINT}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_entries(b: _Block, key: str, allow_empty: bool) -> None:
    form = ("a list of module names, class names or 're:REGEX' strings"
            + ("" if allow_empty else ", not empty"))
    entries = b.block[key]
    if not isinstance(entries, list) or not (entries or allow_empty) or len(entries) > MAX_ENTRIES:
        raise b.fail(key, form)
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry.strip() or len(entry) > MAX_ENTRY_CHARS:
            raise AtvSparseError(f"{b.where}: {b.prefix}.{key}[{i}]: expected a non-empty module name, class name "
                                 f"or 're:REGEX' of at most {MAX_ENTRY_CHARS} characters, found {_short(entry)}; "
                                 f"{_HINT}")
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            # sre raises OverflowError for a huge repeat count and RecursionError for deep nesting
            except (re.error, OverflowError, RecursionError, ValueError) as e:
                raise AtvSparseError(f"{b.where}: {b.prefix}.{key}[{i}]: {_short(entry)} is not a valid regular "
                                     f"expression ({e}); expected 're:' followed by a Python regex; {_HINT}") from None


def check_quantization_config(block: dict, where: str, prefix: str = "quantization_config") -> Pattern:
    """Validate one ``quantization_config`` block read from ``where``; return its pattern.

    prefix: how the block is reached in the file, for the message (``text_config.quantization_config``).
    """
    if not isinstance(block, dict):
        raise AtvSparseError(f"{where}: {prefix} is a JSON {type(block).__name__}, not a JSON object; {_HINT}")
    b = _Block(block, where, prefix)
    if block.get("quant_method") != QUANT_METHOD:
        raise AtvSparseError(f"{where}: {prefix}.quant_method is {_short(block.get('quant_method'))}, "
                             f"not {QUANT_METHOD!r}; this is not an atv_sparse checkpoint")
    version = block.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise AtvSparseError(f"{where}: atv_sparse checkpoint format version {_short(version)} is not supported by "
                             f"this atv_sparse (it reads version {FORMAT_VERSION}); upgrade atv_sparse")
    unknown = sorted(k for k in block if k not in _CHECKS)
    if unknown:
        raise AtvSparseError(f"{where}: {prefix}.{unknown[0]}: unknown key; expected only "
                             f"{', '.join(_CHECKS)} (format version {FORMAT_VERSION}); {_HINT}")
    if block.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise AtvSparseError(f"{where}: unknown atv_sparse format {_short(block.get('format'))}; "
                             f"expected {FORMAT_NAME!r}")
    for key, check in _CHECKS.items():
        if key in block and check is not None:
            check(b, key)
    return _pattern(b)


def _pattern(b: _Block) -> Pattern:
    text, sparsity = b.block.get("pattern"), b.block.get("sparsity")
    form = "'N:M' with 0 < N < M <= 1024 (e.g. '2:4', '4:8') or 'unstructured'"
    if not isinstance(text, str):
        raise b.fail("pattern", form)
    if "sparsity" in b.block and not (_is_number(sparsity) and math.isfinite(sparsity) and 0 < sparsity < 1):
        raise b.fail("sparsity", "a number strictly between 0 and 1 (the fraction of weights removed)")
    if text == "unstructured":
        if sparsity is None:
            raise b.fail("sparsity", "a number strictly between 0 and 1 (an unstructured pattern needs it)")
        return parse_pattern(text, sparsity)
    nm = _NM.fullmatch(text)
    if nm is None:
        raise AtvSparseError(f"{b.where}: {b.prefix}.pattern: pattern {text!r} is not N:M; expected {form}; {_HINT}")
    n, m = int(nm[1]), int(nm[2])
    if not n < m <= 1024:
        raise AtvSparseError(f"{b.where}: {b.prefix}.pattern: pattern {text!r}: N:M needs 0 < N < M <= 1024 "
                             f"(N weights kept of every M); {_HINT}")
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise b.fail("sparsity", f"{1 - n / m!r} (1 - N / M for pattern {text}) or no sparsity key")
    return parse_pattern(text)


def _check_str(regex: re.Pattern, form: str):
    def check(b: _Block, key: str) -> None:
        if not isinstance(b.block[key], str) or regex.fullmatch(b.block[key]) is None:
            raise b.fail(key, form)
    return check


def _check_settings(b: _Block, key: str) -> None:
    if not isinstance(b.block[key], dict):
        raise b.fail(key, "a JSON object of the method's settings")


# key -> its check (None: checked elsewhere); the order is the order errors list them in.
_CHECKS = {
    "quant_method": None,
    "format": None,
    "format_version": None,
    "pattern": None,
    "sparsity": None,
    "method": _check_str(_NAME, "a method name such as 'wanda' (lower case letters, digits, '_' or '-')"),
    "method_settings": _check_settings,
    "targets": lambda b, key: _check_entries(b, key, allow_empty=False),
    "ignore": lambda b, key: _check_entries(b, key, allow_empty=True),
    "version": _check_str(_VERSION, "a version string such as '0.1.0'"),
}


def check_model_config(config: dict, where: str) -> Pattern | None:
    """Validate every ``quantization_config`` copy of a parsed config.json; the pattern, or None if dense.

    A vision-language model carries the block twice (top level, and ``text_config`` where its
    language model reads it): both are checked and must be equal, since transformers reads one and
    vLLM the other. A ``quantization_config`` of another method is refused: this loader reads
    atv_sparse checkpoints only.
    """
    if not isinstance(config, dict):
        raise AtvSparseError(f"{where}: not a model config (expected a JSON object)")
    top = config.get("quantization_config")
    text_config = config.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        raise AtvSparseError(f"{where}: text_config is a JSON {type(text_config).__name__}, expected a JSON object")
    inner = (text_config or {}).get("quantization_config")
    if top is None and inner is None:
        return None
    if top is None:
        raise AtvSparseError(f"{where}: text_config.quantization_config is set but the top-level "
                             "quantization_config is missing; transformers reads the top-level one, so both "
                             f"must hold the same block; {_HINT}")
    pattern = check_quantization_config(top, where)
    if inner is not None:
        check_quantization_config(inner, where, "text_config.quantization_config")
        differing = sorted(k for k in set(top) | set(inner) if top.get(k) != inner.get(k))
        if differing:
            raise AtvSparseError(f"{where}: text_config.quantization_config.{differing[0]} differs from "
                                 f"quantization_config.{differing[0]}; the two copies must be equal (transformers "
                                 f"reads one, vLLM the other); {_HINT}")
    return pattern
