"""Synthetic multimodal tasks (drawn with PIL, deterministic from a seed) for training and
evaluating the bundled tiny vision-language model; see :mod:`atv_sparse.data.synthetic`."""

from .synthetic import (SPLITS, TASKS, Item, calibration_conversations, describe_tasks, generate, split_of,
                        test_items)

__all__ = ["SPLITS", "TASKS", "Item", "calibration_conversations", "describe_tasks", "generate", "split_of",
           "test_items"]
