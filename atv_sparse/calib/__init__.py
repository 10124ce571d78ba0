"""Calibration data: token windows from a text file, a JSONL file or the embedded default text."""

from .text import DEFAULT_CALIBRATION, default_calibration_text, read_calibration_text, text_windows

__all__ = ["DEFAULT_CALIBRATION", "default_calibration_text", "read_calibration_text", "text_windows"]
