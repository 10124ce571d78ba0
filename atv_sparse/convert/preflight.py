"""Checks that a conversion can finish, run before any weight is read or calibration pass starts.

Pruning a 7-8B model takes an hour of GPU time: a missing optional package, a full disk or an
unreadable report found at the end throws all of it away. Each check here raises one
``AtvSparseError`` naming the parameter, file, directory or device, in seconds, with nothing written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import AtvSparseError

# Room beyond the estimated output: safetensors headers, config, reports, copied tokenizer files.
DISK_MARGIN = 1.05
DISK_SLACK_BYTES = 64 * 2**20


def require_module(module: str, extra: str, param: str) -> None:
    """Parameter ``param`` needs ``module`` (the ``extra`` extra of atv-sparse): refuse now if it is missing."""
    if importlib.util.find_spec(module) is None:
        raise AtvSparseError(f"`{param}` needs {module}, which is not installed; pip install {module} "
                             f"(or atv-sparse[{extra}]), or drop `{param}`")


def check_device(device: torch.device) -> None:
    """The compute device exists on this machine (``cuda:3`` on a two-GPU machine does not)."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AtvSparseError(f"`device` {device}: CUDA is not available on this machine; use `device` cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise AtvSparseError(f"`device` {device}: this machine has {count} CUDA device(s) "
                                 f"(cuda:0 to cuda:{count - 1})")
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise AtvSparseError(f"`device` {device}: no {device.type} device is available on this machine; "
                             "use `device` cpu or cuda")


def check_output_location(out_dir: Path, output_bytes: int) -> None:
    """``out_dir`` can be created (its nearest existing ancestor is a writable directory) and that
    file system has room for ``output_bytes`` (written to a temporary directory beside it)."""
    out_dir = Path(out_dir).absolute()
    anchor = out_dir.parent
    while not anchor.exists():
        if anchor.parent == anchor:
            break
        anchor = anchor.parent
    if not anchor.is_dir():
        raise AtvSparseError(f"`out_dir` {out_dir}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise AtvSparseError(f"`out_dir` {out_dir}: cannot write in {anchor} (permission denied); choose another `out_dir`")
    need = int(output_bytes * DISK_MARGIN) + DISK_SLACK_BYTES
    free = shutil.disk_usage(anchor).free
    if free < need:
        raise AtvSparseError(f"`out_dir` {out_dir}: {free / 1e9:.2f} GB free on the file system of {anchor}, the "
                             f"output needs about {need / 1e9:.2f} GB; free some space or choose another `out_dir`")


def check_processor(ckpt: Path):
    """A vision-language checkpoint's processor loads and has a chat template; returns the processor.

    Calibration renders every conversation with the checkpoint's own chat template; without one the
    prompts would not look like what the model was trained on (and its evaluation cannot run).
    """
    from ..models.processors import load_processor

    processor = load_processor(ckpt)
    if not getattr(processor, "chat_template", None):
        raise AtvSparseError(f"{ckpt}: the processor has no chat template (chat_template.jinja, or chat_template "
                             "in processor_config.json / tokenizer_config.json); copy it from the original model")
    return processor


def read_budget_report(path: str | Path) -> int:
    """The total visual-token budget of an ATV run's ``prune_report.json`` (``PruneRecipe.budget_target``),
    which the ABS / DBS / drift-fixed selectors match (without it: the drift rule's total on a dense pass,
    docs/design.md 4.5)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
        total = sum(int(b["visual_tokens"]) for b in report["blocks"])
    except OSError as e:
        raise AtvSparseError(f"budget report {path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError):
        raise AtvSparseError(f"budget report {path}: not a prune_report.json of an ATV run "
                             "(needs blocks[].visual_tokens)") from None
    return total
