"""Shipping a trained tiny model in the package: its files copied into ``atv_sparse/assets/<name>``
(its test scores are recorded beside them by ``evaluation.scorecard.record_test_scores``)."""

from __future__ import annotations

import shutil
from pathlib import Path

FILES = ("config.json", "generation_config.json", "model.safetensors", "chat_template.jinja", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json")


def copy_checkpoint(src: Path, dst: Path) -> None:
    """The model and processor files of ``src`` into ``dst`` (created)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
