"""Build ``libatv_sparse_cuda.so`` from ``csrc/*.cu`` with nvcc (and ninja when present).

Standard library only: ``setup.py`` loads this file by path (``importlib.util.spec_from_file_location``),
before torch may be installed, and calls :func:`build_cuda_library`.

When it builds (one ``atv-sparse: ...`` log line says what it did or why it skipped):

- ``ATV_SPARSE_SKIP_CUDA_BUILD=1``: never.
- otherwise it needs ``csrc/*.cu`` sources and nvcc (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``,
  ``/usr/local/cuda/bin``), and
- a CUDA driver that sees at least one GPU, unless ``ATV_SPARSE_FORCE_CUDA_BUILD=1``.

Why a GPU: the library is useless without one, and compiling the kernels for four architectures
takes minutes on a small machine; CPU-only machines that happen to have the CUDA toolkit (CI, dev
boxes, this project's own) keep ``pip install -e .`` fast, and ``.ci/cuda_compile_check.sh``
compiles the sources there instead. Docker image builds without a GPU set the force switch.

A failed compile logs the compiler's last lines and the package installs without the library
(the Triton and reference backends still work); with ``ATV_SPARSE_FORCE_CUDA_BUILD=1`` it is an
error instead. ``ATV_SPARSE_CUDA_ARCHS`` overrides the target list (default ``80;86;89;90a``;
separators ``;``, ``,`` or spaces); the highest plain (no ``a`` / ``f`` suffix) architecture is
also embedded as PTX so newer GPUs can JIT it.

By hand, from a source checkout (forced, into the package directory, where the loader looks)::

    python -m atv_sparse.ops.build_cuda [--archs "90a"]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

LIB_NAME = "libatv_sparse_cuda.so"
DEFAULT_ARCHS = "80;86;89;90a"
ENV_SKIP = "ATV_SPARSE_SKIP_CUDA_BUILD"
ENV_FORCE = "ATV_SPARSE_FORCE_CUDA_BUILD"
ENV_ARCHS = "ATV_SPARSE_CUDA_ARCHS"
NVCC_FLAGS = ("-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC")


def log(message: str) -> None:
    print(f"atv-sparse: {message}", flush=True)


def find_nvcc(env: dict | None = None) -> str | None:
    """Path of nvcc, or None."""
    env = os.environ if env is None else env
    for root in (env.get("CUDA_HOME"), env.get("CUDA_PATH")):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def find_ninja(env: dict | None = None) -> str | None:
    """Path of ninja (on PATH, or from the ``ninja`` pip package), or None."""
    env = os.environ if env is None else env
    found = shutil.which("ninja", path=env.get("PATH"))
    if found:
        return found
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        return path if os.access(path, os.X_OK) else None
    except ImportError:
        return None


def cuda_device_present() -> bool:
    """True when the CUDA driver loads and reports at least one device (no toolkit involved)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def parse_archs(text: str) -> list[str]:
    """``"80;86;89;90a"`` -> ``["80", "86", "89", "90a"]``; ValueError naming a malformed entry."""
    archs = [a for a in re.split(r"[;,\s]+", text.strip()) if a]
    for arch in archs:
        if not re.fullmatch(r"[1-9][0-9]{1,2}[af]?", arch):
            raise ValueError(f"{ENV_ARCHS}: {arch!r} is not an architecture like 80, 90a or 100f")
    if not archs:
        raise ValueError(f"{ENV_ARCHS} is empty; give e.g. \"80;90a\"")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the highest plain one (forward compatibility)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    plain = [a for a in archs if a.isdigit()]
    if plain:
        top = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def cuda_sources(src_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(src_dir, "*.cu")))


def skip_reason(src_dir: str, env: dict | None = None) -> str | None:
    """Why the library should not be built here, or None to build it."""
    env = os.environ if env is None else env
    if env.get(ENV_SKIP) == "1":
        return f"{ENV_SKIP}=1"
    if not cuda_sources(src_dir):
        return f"no CUDA sources (*.cu) in {src_dir}"
    if find_nvcc(env) is None:
        return "nvcc was not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda/bin)"
    if env.get(ENV_FORCE) != "1" and not cuda_device_present():
        return f"no CUDA GPU on this machine (set {ENV_FORCE}=1 to build anyway)"
    return None


def _ninja_path(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_file(nvcc: str, sources: list[str], objects: list[str], lib: str, flags: list[str]) -> str:
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(nvcc)}",
        f"flags = {' '.join(shlex.quote(f) for f in flags)}",
        "rule compile",
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared $in -o $out",
        "  description = link $out",
    ]
    lines += [f"build {_ninja_path(obj)}: compile {_ninja_path(src)}" for src, obj in zip(sources, objects, strict=True)]
    lines.append(f"build {_ninja_path(lib)}: link {' '.join(_ninja_path(o) for o in objects)}")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str]) -> None:
    """Run a build command; on failure raise CalledProcessError carrying its output."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=proc.stdout)


def compile_library(nvcc: str, sources: list[str], out_path: str, archs: list[str], build_dir: str,
                    ninja: str | None = None) -> None:
    """Compile ``sources`` into the shared library ``out_path`` (replaced atomically).

    With ninja: one object per source, compiled in parallel and rebuilt only when a source or an
    included header changed (nvcc writes the dependency files). Without: one nvcc call.
    Raises CalledProcessError (with the compiler output) on failure.
    """
    os.makedirs(build_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    flags = [*NVCC_FLAGS, f"--threads={min(len(archs), os.cpu_count() or 1)}", *gencode_flags(archs)]
    staged = os.path.join(build_dir, LIB_NAME)
    if ninja:
        objects = [os.path.join(build_dir, os.path.basename(s) + ".o") for s in sources]
        with open(os.path.join(build_dir, "build.ninja"), "w", encoding="utf-8") as f:
            f.write(_ninja_file(nvcc, [os.path.abspath(s) for s in sources], objects, staged, flags))
        _run([ninja, "-C", build_dir])
    else:
        _run([nvcc, *flags, "-shared", *sources, "-o", staged])
    # Copy then rename: a process that already mapped the old library keeps a valid file.
    tmp = out_path + ".tmp"
    shutil.copyfile(staged, tmp)
    os.replace(tmp, out_path)


def build_cuda_library(src_dir: str, out_dir: str, env: dict | None = None,
                       build_dir: str | None = None) -> str | None:
    """Build ``out_dir/libatv_sparse_cuda.so`` from ``src_dir/*.cu`` when the rules allow.

    Objects go to ``build_dir`` (default: ``build/atv_sparse_cuda`` beside ``src_dir``).
    Returns the library's path, or None when skipped or failed (one log line says why). Raises
    RuntimeError only when ``ATV_SPARSE_FORCE_CUDA_BUILD=1`` and the build could not be done.
    """
    env = os.environ if env is None else env
    forced = env.get(ENV_FORCE) == "1" and env.get(ENV_SKIP) != "1"
    why = skip_reason(src_dir, env)
    if why is None:
        try:
            archs = parse_archs(env.get(ENV_ARCHS) or DEFAULT_ARCHS)
        except ValueError as err:
            why = str(err)
    if why is not None:
        log(f"not building the CUDA library: {why}; the Triton and reference backends still work")
        if forced:
            raise RuntimeError(f"{ENV_FORCE}=1 but the CUDA library cannot be built: {why}")
        return None
    nvcc = find_nvcc(env)
    ninja = find_ninja(env)
    sources = cuda_sources(src_dir)
    out_path = os.path.join(out_dir, LIB_NAME)
    # Beside csrc/, in the build/ folder setuptools uses too: ninja rebuilds only what changed.
    build_dir = build_dir or os.path.join(os.path.dirname(os.path.abspath(src_dir)), "build", "atv_sparse_cuda")
    log(f"building {LIB_NAME} for sm_{', sm_'.join(archs)} with {nvcc}"
        f"{' and ' + ninja if ninja else ''} into {out_dir} (set {ENV_SKIP}=1 to skip)")
    try:
        compile_library(nvcc, sources, out_path, archs, build_dir, ninja)
    except (subprocess.CalledProcessError, OSError) as err:
        tail = "\n".join((getattr(err, "output", None) or str(err)).strip().splitlines()[-20:])
        log(f"building the CUDA library failed; installing without it (set {ENV_FORCE}=1 to make this "
            f"an error):\n{tail}")
        if forced:
            raise RuntimeError(f"building {LIB_NAME} failed:\n{tail}") from err
        return None
    log(f"built {out_path}")
    return out_path


def main(argv: list[str] | None = None) -> int:
    """Forced build from a source checkout into the package directory."""
    parser = argparse.ArgumentParser(description=f"Build {LIB_NAME} from csrc/ (forced).")
    parser.add_argument("--archs", help=f"architectures, default ${ENV_ARCHS} or {DEFAULT_ARCHS}")
    args = parser.parse_args(argv)
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src_dir = os.path.join(os.path.dirname(package_dir), "csrc")
    if not os.path.isdir(src_dir):
        print(f"error: {src_dir} does not exist: build from a source checkout of atv-sparse", file=sys.stderr)
        return 2
    env = {**os.environ, ENV_FORCE: "1"}
    env.pop(ENV_SKIP, None)
    if args.archs:
        env[ENV_ARCHS] = args.archs
    try:
        build_cuda_library(src_dir, package_dir, env)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
