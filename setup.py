"""atv-sparse: pip-installable package; builds the optional CUDA library from csrc/ with nvcc.

The CUDA library is built only when csrc/ has sources, nvcc is on PATH and
ATV_SPARSE_SKIP_CUDA_BUILD is not set; otherwise one log line says why it was skipped and the
package installs without it. ATV_SPARSE_CUDA_ARCHS overrides the target architectures
(default "80;86;89;90a").
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_NAME = "libatv_sparse_cuda.so"


def build_cuda_library(out_dir: str) -> None:
    sources = sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu")))
    if os.environ.get("ATV_SPARSE_SKIP_CUDA_BUILD") == "1":
        print("atv-sparse: ATV_SPARSE_SKIP_CUDA_BUILD=1, skipping the CUDA library")
        return
    if not sources:
        print("atv-sparse: no CUDA sources in csrc/, skipping the CUDA library")
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("atv-sparse: nvcc not found, skipping the CUDA library (the Triton and reference backends still work)")
        return
    archs = os.environ.get("ATV_SPARSE_CUDA_ARCHS", "80;86;89;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    os.makedirs(out_dir, exist_ok=True)
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *gencode, *sources,
           "-o", os.path.join(out_dir, LIB_NAME)]
    print("atv-sparse: building the CUDA library:", " ".join(cmd))
    subprocess.check_call(cmd)


class BuildPy(build_py):
    def run(self):
        super().run()
        build_cuda_library(os.path.join(self.build_lib, "atv_sparse"))


setup(
    name="atv-sparse",
    version="0.1.0",
    description="Prune LLMs and vision-language models to 2:4, 4:8 or unstructured sparsity and run them fast",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["atv_sparse", "atv_sparse.*"]) + ["atv_sparse.kernels"],
    package_dir={"atv_sparse.kernels": "kernels"},
    package_data={"atv_sparse.calib": ["default_calib.txt"], "atv_sparse": ["assets/*/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=5.0",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "pillow",
    ],
    extras_require={"test": ["pytest>=8", "matplotlib"], "plot": ["matplotlib"]},
    # vLLM loads this in every process it starts; the module imports vllm lazily.
    entry_points={"vllm.general_plugins": ["atv_sparse = atv_sparse.vllm_plugin:register"]},
    cmdclass={"build_py": BuildPy},
)
