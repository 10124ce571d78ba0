"""Calibration data: token windows from a text file, a JSONL file or the embedded default text;
image-text conversations through a checkpoint's processor; ``load_calibration`` picks and builds."""

from .samples import (DEFAULT_MULTIMODAL_CALIBRATION, CalibrationSet, conversation_calibration, is_text_file,
                      load_calibration)
from .text import (DEFAULT_CALIBRATION, check_calibration_size, default_calibration_text, read_calibration_text,
                   text_windows)

__all__ = ["CalibrationSet", "DEFAULT_CALIBRATION", "DEFAULT_MULTIMODAL_CALIBRATION", "check_calibration_size",
           "conversation_calibration", "default_calibration_text", "is_text_file", "load_calibration",
           "read_calibration_text", "text_windows"]
