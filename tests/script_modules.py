"""Scripts of the repository (benchmarks/, fuzz/) imported as modules by their file path.

The tests call functions of these scripts without putting the scripts' folders on ``sys.path``
(which would let any test import anything from there). A script that imports a sibling by name
(``import targets``) finds it in ``sys.modules`` once the sibling has been loaded here first.
"""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The module of ``REPO / relative_path``, executed once and registered under its file stem
    (dataclasses, pickling and sibling scripts look a module up by that name)."""
    path = REPO / relative_path
    if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path):
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
