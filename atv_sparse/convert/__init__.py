"""``python -m atv_sparse.convert``: prune a checkpoint and write it compressed, with its helpers.

- ``cli``: the command line (``run``, ``main``): parse, build the recipe, stream the pruned model
  into the writer;
- ``estimate``: output bytes and peak memory from shapes alone, before any weight is read;
- ``preflight``: checks before any work (device, output location and free space, processor,
  ``--budget-from``, optional modules);
- ``reports``: what is recorded beside the weights and printed (sparsity.json, method settings,
  the dry run, the summary, dense against pruned accuracy);
- ``plot``: the per-block figure (``--plot``);
- ``resume``: the journal of a run and ``--resume``.
"""

from .cli import build_parser, cli_message, main, run

__all__ = ["build_parser", "cli_message", "main", "run"]
