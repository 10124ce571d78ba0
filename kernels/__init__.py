"""Triton kernels of atv-sparse, installed as ``atv_sparse.kernels``.

- ``nm_layout``: the N:M kernel layout (checkpoint values + bitmask read through a position table).
- ``nm_gemv``: the skinny N:M sparse GEMM for decode-sized token counts (and fused gate/up).
- ``nm_gemm``: the N:M GEMM for larger token counts (tiles decompressed in registers, tl.dot).
"""

# This folder sits at the top of the repository, so from the repo root (the first entry of sys.path)
# ``import kernels`` finds it before Hugging Face's ``kernels`` package, which transformers imports at
# start-up. It only ever belongs to ``atv_sparse.kernels`` (setup.py's package_dir, for editable and
# wheel installs alike): imported under the top-level name it steps aside, loading the ``kernels`` found
# on sys.path outside this repository into sys.modules (the import system returns whatever sys.modules
# holds once this file has run). With none installed it leaves an empty module with no file and no
# version, which is how transformers (5.17-5.25) recognises a folder shadowing a package that is not
# installed; raising here instead would break ``import transformers`` from the repo root.
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import types as _types

    class _NotInstalled(_types.ModuleType):
        def __getattr__(self, name):
            raise AttributeError(f"Hugging Face's 'kernels' package is not installed (no kernels.{name}); "
                                 "the repository's kernels/ folder is atv_sparse.kernels")

    _repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _repo]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.origin == __file__:
        _module = _NotInstalled("kernels")
        _module.__file__, _module.__path__ = None, []
        _module.__spec__ = _machinery.ModuleSpec("kernels", None, is_package=True)
        _sys.modules["kernels"] = _module
    else:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del _sys.modules["kernels"]
            raise
