"""atv-sparse: pip-installable package; builds the optional CUDA library from csrc/ with nvcc.

The build rules live in atv_sparse/ops/build_cuda.py (standard library only, loaded by path: torch
may not be installed yet): it builds when nvcc and a CUDA GPU are present, or with
ATV_SPARSE_FORCE_CUDA_BUILD=1; ATV_SPARSE_SKIP_CUDA_BUILD=1 skips; ATV_SPARSE_CUDA_ARCHS overrides
the architectures (default "80;86;89;90a"). Otherwise one log line says why it skipped, and a failed
compile is logged without failing the install.
"""

import importlib.util
import os
import re

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def build_cuda_library(out_dir: str) -> None:
    spec = importlib.util.spec_from_file_location("atv_sparse_build_cuda",
                                                  os.path.join(HERE, "atv_sparse", "ops", "build_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_cuda_library(os.path.join(HERE, "csrc"), out_dir)


def read_version() -> str:
    """The one source of the version: ``__version__`` in atv_sparse/__init__.py."""
    text = open(os.path.join(HERE, "atv_sparse", "__init__.py"), encoding="utf-8").read()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def package_data() -> dict[str, list[str]]:
    """Every file of the package tree that is not Python source (bundled model, calibration text,
    templates), found by walking it, so that a new asset cannot be left out of the wheel."""
    root = os.path.join(HERE, "atv_sparse")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files
                  if not f.endswith((".py", ".pyc", ".so"))]
    return {"atv_sparse": sorted(found)}


class BuildPy(build_py):
    def run(self):
        super().run()
        # An editable install (PEP 660) imports atv_sparse from the source tree: the library goes there.
        editable = getattr(self, "editable_mode", False)
        build_cuda_library(os.path.join(HERE, "atv_sparse") if editable else os.path.join(self.build_lib, "atv_sparse"))


setup(
    name="atv-sparse",
    version=read_version(),
    description="Prune LLMs and vision-language models to 2:4, 4:8 or unstructured sparsity and run them fast",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["atv_sparse", "atv_sparse.*"]),
    package_data=package_data(),
    # The lowest transformers / triton are what CI's GPU-stack leg installs; torch 2.11 is what the
    # GPU machines run (CI's CPU legs use 2.13).
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=5.17",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "pillow",
        # the cpu backend's kernels are built on first use by torch.utils.cpp_extension, which needs ninja
        "ninja; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
    ],
    extras_require={"test": ["pytest>=8", "matplotlib", "build"], "plot": ["matplotlib"], "vllm": ["vllm>=0.32,<0.34"]},
    # vLLM loads this in every process it starts; the module imports vllm lazily.
    entry_points={"vllm.general_plugins": ["atv_sparse = atv_sparse.vllm_plugin:register"]},
    cmdclass={"build_py": BuildPy},
)
