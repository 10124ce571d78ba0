"""Which linears get pruned: ``targets`` / ``ignore`` lists of names, class names and ``re:`` regexes.

A pattern matches a module when it equals the full module name, is a dotted suffix of it
(``down_proj`` matches ``model.layers.3.mlp.down_proj``), equals the module's class name, or is
``re:REGEX`` with ``re.match`` succeeding on the full name (the compressed-tensors convention).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

from torch import nn

from ..errors import AtvSparseError
from ..patterns import Pattern


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


@dataclasses.dataclass
class TargetPlan:
    """targets: module name -> linear, in model order; skipped: name -> why it stays dense."""

    targets: dict[str, nn.Linear]
    skipped: dict[str, str]


def resolve_targets(model: nn.Module, blocks_prefix: str, pattern: Pattern, targets: list[str] | None = None,
                    ignore: list[str] = (), skip_incompatible: bool = False) -> TargetPlan:
    """Resolve the linears to prune inside the decoder blocks under ``blocks_prefix``.

    Default targets: every ``nn.Linear`` of the decoder blocks (so never ``lm_head``, the
    embeddings, a vision tower or a projector unless named in ``targets``). A target or ignore
    pattern that matches nothing gives a warning; an invalid regex, a tied ``lm_head``, or an
    N:M-incompatible shape (without ``skip_incompatible``) an error.
    """
    for p in list(targets or []) + list(ignore):
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise AtvSparseError(f"pattern {p!r} is not a valid regular expression: {e}") from None
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = {name: m for name, m in linears.items() if name.startswith(blocks_prefix + ".")}
    if targets:
        chosen = {}
        for p in targets:
            hits = [name for name, m in linears.items() if matches(name, m, p)]
            if not hits:
                warnings.warn(f"target {p!r} matches no linear layer", stacklevel=2)
            chosen.update({name: linears[name] for name in hits})
        candidates = {name: m for name, m in linears.items() if name in chosen}
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        for name, m in candidates.items():
            if m is head and embeddings is not None and m.weight is embeddings.weight:
                raise AtvSparseError(f"target {name} is tied to the input embeddings (tie_word_embeddings); "
                                     "pruning it would prune the embeddings too")
    else:
        candidates = in_blocks
    for p in ignore:
        if not any(matches(name, m, p) for name, m in linears.items()):
            warnings.warn(f"ignore pattern {p!r} matches no linear layer", stacklevel=2)
    plan = TargetPlan({}, {})
    for name, module in candidates.items():
        if any(matches(name, module, p) for p in ignore):
            continue
        try:
            pattern.check_layer(name, module.in_features)
        except AtvSparseError as e:
            if not skip_incompatible:
                raise
            plan.skipped[name] = str(e).split(";")[0]
            continue
        plan.targets[name] = module
    if not plan.targets:
        raise AtvSparseError("no linear layer left to prune after `targets` / `ignore`")
    return plan
