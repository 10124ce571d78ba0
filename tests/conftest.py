"""Tiny offline checkpoints (random weights, in-process tokenizer) written once per session."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on a CPU-only machine
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One config per Triton kernel, no autotuning: on a GPU every new key would compile and time up to 18
# configs (the kernel tests alone: 1,000+ compilations, past a lent GPU's 15 minutes). The autotuned
# path has tests of its own (test_kernels.py::test_autotuned_launch_on_gpu) that unset it.
os.environ.setdefault("ATV_SPARSE_TRITON_ONE_CONFIG", "1")
torch.set_num_threads(1)  # 2 threads on a shared 2-core machine make forwards erratic
# Packed models must equal their dense exports bit for bit in the rest of the suite (the reference
# backend); the cpu backend's own tests (test_cpu_backend.py) turn its kernels on for themselves.
os.environ.setdefault("ATV_SPARSE_CPU_BACKEND", "0")

# The tiny LLM checkpoints live with the other fixtures of every family (tinybench.families).
from atv_sparse.tinybench.families import write_tiny_llm as write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2", "qwen2", seed=1)


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory):
    from atv_sparse.calib import default_calibration_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(default_calibration_text()[:6000])
    return path
