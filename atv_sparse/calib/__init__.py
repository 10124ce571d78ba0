"""Calibration data: token windows from a text file, a JSONL file or the embedded default text;
image-text conversations through a checkpoint's processor; ``load_calibration`` picks and builds;
``CalibrationSet`` / ``SampleTokens`` are what a pruning run reads. Imports nothing above it
(prune/, the bench): the default conversations come in as an argument."""

from .calibration_set import CalibrationSet, SampleTokens
from .samples import DEFAULT_MULTIMODAL_CALIBRATION, conversation_calibration, is_text_file, load_calibration
from .text import (DEFAULT_CALIBRATION, check_calibration_size, default_calibration_text, read_calibration_text,
                   text_windows)

__all__ = ["CalibrationSet", "DEFAULT_CALIBRATION", "SampleTokens", "DEFAULT_MULTIMODAL_CALIBRATION", "check_calibration_size",
           "conversation_calibration", "default_calibration_text", "is_text_file", "load_calibration",
           "read_calibration_text", "text_windows"]
