"""The package as users get it: a built wheel and sdist hold the whole source tree, the wheel
imports from any directory, and nothing of the repository but ``atv_sparse`` is importable under a
top-level name from its root (``kernels`` is Hugging Face's package, imported by transformers)."""

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import atv_sparse

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".so")  # bytecode and the optional CUDA library are build outputs

pytestmark = pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="needs the source tree")


def source_files(folder: Path) -> set[str]:
    """Files under ``folder`` (relative paths), build outputs left out."""
    found = set()
    for path, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        found |= {str((Path(path) / f).relative_to(folder)) for f in files if not f.endswith(SKIPPED_SUFFIXES)}
    return found


def expected_wheel_files() -> set[str]:
    return {f"atv_sparse/{f}" for f in source_files(REPO / "atv_sparse")}


def python(code: str, cwd: Path, env_extra: dict | None = None, path: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path is not None:
        env["PYTHONPATH"] = path
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist and wheel, the wheel built from the sdist (``python -m build``'s default)."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "ATV_SPARSE_SKIP_CUDA_BUILD": "1"}
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def test_wheel_holds_every_subpackage_kernel_and_asset(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    files = {n for n in names if ".dist-info/" not in n}
    expected = expected_wheel_files()
    assert not expected - files, f"missing from the wheel: {sorted(expected - files)}"
    assert not files - expected, f"in the wheel but not in the source tree: {sorted(files - expected)}"
    for package in {str(Path(f).parent) for f in files if f.endswith(".py")}:
        assert f"{package}/__init__.py" in files, f"{package} has modules but no __init__.py"
    assert f"\nVersion: {atv_sparse.__version__}\n" in metadata
    assert "atv_sparse = atv_sparse.vllm_plugin:register" in entry_points


def test_sdist_holds_sources_kernels_and_csrc(dist):
    _, sdist = dist
    with tarfile.open(sdist) as t:
        root = t.getnames()[0].split("/")[0]
        names = {n.removeprefix(root + "/") for n in t.getnames() if t.getmember(n).isfile()}
    expected = {f"atv_sparse/{f}" for f in source_files(REPO / "atv_sparse")}
    expected |= {f"csrc/{f}" for f in source_files(REPO / "csrc")}
    expected |= {"README.md", "setup.py", "pyproject.toml", "MANIFEST.in"}
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert f"atv_sparse-{atv_sparse.__version__}" == root


def test_installed_wheel_imports_from_any_directory(dist, tmp_path):
    """Every module of the wheel imports from a directory outside the repository, and comes from the
    wheel (not from this checkout)."""
    wheel, _ = dist
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = python(f"""
        import importlib, pkgutil
        import atv_sparse
        assert atv_sparse.__file__.startswith({str(target)!r}), atv_sparse.__file__
        imported = []
        for info in pkgutil.walk_packages(atv_sparse.__path__, "atv_sparse."):
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as e:
                if e.name != "vllm":  # the plugin's modules need vLLM; everything else must import
                    raise
            imported.append(info.name)
        import atv_sparse.kernels.nm_gemv
        assert atv_sparse.kernels.nm_gemv.__file__.startswith({str(target)!r})
        print(len(imported))
    """, cwd=elsewhere, path=str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 40


def test_no_top_level_module_of_the_repo_shadows_an_installed_package():
    """From the repo root (first on sys.path) nothing of the repository is importable under a top-level
    name but ``atv_sparse``: ``kernels`` in particular is Hugging Face's package (which transformers
    imports at start-up) or absent, never the project's Triton kernels."""
    found = python("""
        import importlib.util
        spec = importlib.util.find_spec("kernels")
        print(spec.origin if spec is not None else "absent")
    """, cwd=REPO)
    assert found.returncode == 0, found.stderr[-3000:]
    origin = found.stdout.split()[-1]
    # the repository's own top-level package or module, not any path below the root: a virtualenv made
    # in the checkout (`python -m venv .venv`, as many users do) holds Hugging Face's `kernels` there too
    assert origin not in (str(REPO / "kernels" / "__init__.py"), str(REPO / "kernels.py")), origin
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"atv_sparse"}, packages


def test_transformers_imports_from_the_repo_root():
    """transformers imports (5.25) or probes (5.17) `kernels` at start-up, from the repo root too."""
    result = python("""
        import transformers.activations  # imports integrations.hub_kernels
        import atv_sparse
        import atv_sparse.kernels.nm_gemv
        print("ok")
    """, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
