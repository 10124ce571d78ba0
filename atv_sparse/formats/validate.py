"""The checks every loader runs on a checkpoint directory before it reads a single tensor.

``validate_checkpoint(dir)``: config.json parsed strictly, each ``quantization_config`` copy validated
(``spec.check_model_config``), the index and every shard header validated
(``safetensors_io``). ``atv_sparse.load``, the transformers quantizer and the vLLM plugin all
call it, so a file one of them refuses, the others refuse with the same message.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import AtvSparseError
from ..patterns import Pattern
from .safetensors_io import checkpoint_files, checkpoint_tensors, parse_json
from .spec import check_model_config

MAX_CONFIG_BYTES = 50_000_000


@dataclasses.dataclass
class CheckedCheckpoint:
    config: dict  # config.json as parsed
    pattern: Pattern | None  # None: a dense checkpoint (no quantization_config)
    files: list[Path]  # the safetensors files
    tensors: dict[str, tuple[Path, dict]]  # tensor name -> (file, validated header entry)


def read_config_json(model_dir: str | Path) -> dict:
    """config.json of ``model_dir`` as a dict; any unreadable or non-object file is an AtvSparseError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AtvSparseError(f"{model_dir}: no such checkpoint directory" if not model_dir.exists()
                             else f"{model_dir}: not a directory; give a Hugging Face model directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise AtvSparseError(f"{model_dir}: not a model directory (no config.json)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AtvSparseError(f"{path}: {path.stat().st_size} bytes is too large for a model config")
    config = parse_json(path.read_bytes(), str(path), constants=True)
    if not isinstance(config, dict):
        raise AtvSparseError(f"{path}: not a model config (expected a JSON object)")
    return config


def check_config(config: dict, where: str) -> Pattern | None:
    """The parts of a parsed config.json a loader relies on: ``architectures`` and ``quantization_config``."""
    architectures = config.get("architectures", [])
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise AtvSparseError(f"{where}: architectures: expected a list of class names such as "
                             f"[\"LlamaForCausalLM\"], found {str(architectures)[:80]}")
    return check_model_config(config, where)


def validate_checkpoint(model_dir: str | Path) -> CheckedCheckpoint:
    """Validate ``model_dir``'s config.json, index and shard headers; read no tensor data."""
    model_dir = Path(model_dir)
    config = read_config_json(model_dir)
    pattern = check_config(config, str(model_dir / "config.json"))
    files = checkpoint_files(model_dir)
    return CheckedCheckpoint(config, pattern, files, checkpoint_tensors(files))
