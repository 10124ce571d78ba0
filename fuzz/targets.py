"""The fuzz targets: bytes in, and either a normal return or ``AtvSparseError`` out; anything else is a bug.

Shared by the atheris harnesses (``fuzz_*.py``), the deterministic mutation runner
(``mutate.py``, used where atheris is not installed) and the pytest suite
(``tests/test_fuzz_mutations.py``), so all three exercise exactly the same code.

- ``header``: the bytes are a whole ``model.safetensors``. ``read_header`` must accept or refuse
  it; whatever it accepts safetensors must then load, tensor by tensor (the checker may be
  stricter than safetensors, never looser), and every bitmask / values pair goes through the
  loader's pair validation.
- ``config``: the bytes are ``config.json`` of a directory whose shard is valid; the whole
  pre-flight runs (JSON, both quantization_config copies, architectures, headers) and, when it
  passes, the vLLM plugin's block check.
- ``calib``: the first byte picks the reader and suffix (plain ``.txt``, text ``.jsonl``,
  multimodal ``.jsonl``, ShareGPT4V ``.json``), the rest is the file. Beside it: a real PNG, a
  text file named like an image, a decompression bomb and a file outside the directory, for
  fuzzed records to point at.
"""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from pathlib import Path

# atv_sparse comes from the installed package (pip install -e . or a wheel), so the harness fuzzes
# what users run.
from atv_sparse.calib import read_calibration_text
from atv_sparse.calib.multimodal import read_multimodal_file
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.bitmask import validate_compressed
from atv_sparse.formats.validate import validate_checkpoint
from atv_sparse.formats.safetensors_io import read_header
from atv_sparse.vllm_plugin.checks import check_block

HERE = Path(__file__).resolve().parent

CORPUS = HERE / "corpus"
TARGETS = ("header", "config", "calib")
CALIB_KINDS = [("calib.txt", read_calibration_text), ("calib.jsonl", read_calibration_text),
               ("mm.jsonl", read_multimodal_file), ("sharegpt4v.json", read_multimodal_file)]


class _Workdir:
    """One scratch directory per process, laid out once: fuzzers call a target millions of times."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="atv-sparse-fuzz-"))
        self.ckpt = self.root / "ckpt"
        self.ckpt.mkdir()
        (self.ckpt / "model.safetensors").write_bytes((CORPUS / "header" / "packed.safetensors").read_bytes())
        self.calib = self.root / "calib" / "data"
        (self.calib / "img").mkdir(parents=True)
        _png(self.calib / "img" / "ok.png", 4, 3, pixels=True)
        _png(self.calib / "img" / "bomb.png", 30000, 30000)
        (self.calib / "img" / "text.png").write_text("not an image\n")
        _png(self.root / "calib" / "outside.png", 2, 2, pixels=True)


def _png(path: Path, width: int, height: int, pixels: bool = False) -> None:
    """A PNG written by hand (no PIL needed here): real RGB pixels, or only a header claiming the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes([200, 20, 20]) * width for _ in range(height)) if pixels else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


_work: _Workdir | None = None


def workdir() -> _Workdir:
    global _work
    if _work is None:
        _work = _Workdir()
    return _work


def header(data: bytes) -> None:
    from safetensors import safe_open

    path = workdir().root / "fuzz.safetensors"
    path.write_bytes(data)
    entries = read_header(path)
    tensors = {}
    with safe_open(path, "pt") as f:  # accepted -> safetensors must read it without complaint
        for name in entries:
            tensors[name] = f.get_tensor(name)
    for name, bitmask in tensors.items():
        if not name.endswith(".weight_bitmask") or bitmask.dim() != 2:
            continue
        values = tensors.get(name[: -len("_bitmask")] + "_values")
        if values is None:
            continue
        module = name[: -len(".weight_bitmask")]
        for n, m in ((2, 4), (None, None)):
            try:
                validate_compressed(module, bitmask, values, bitmask.shape[0], bitmask.shape[1] * 8, n, m)
            except AtvSparseError:
                pass


def config(data: bytes) -> None:
    work = workdir()
    (work.ckpt / "config.json").write_bytes(data)
    checked = validate_checkpoint(work.ckpt)
    if checked.pattern is not None:
        check_block(checked.config["quantization_config"], "config.json")


def calib(data: bytes) -> None:
    if not data:
        return
    name, reader = CALIB_KINDS[data[0] % len(CALIB_KINDS)]
    path = workdir().calib / name
    path.write_bytes(data[1:])
    reader(path)


def run(target: str, data: bytes) -> bool:
    """Run ``target`` on ``data``; True if it loaded, False if refused with AtvSparseError; else it raises."""
    try:
        globals()[target](data)
    except AtvSparseError:
        return False
    return True


def seeds(target: str) -> list[tuple[str, bytes]]:
    """The committed seed corpus of ``target``: (file name, bytes), sorted by name."""
    return [(p.name, p.read_bytes()) for p in sorted((CORPUS / target).iterdir()) if p.is_file()]


def calib_seed(kind: str, text: str) -> bytes:
    """A calib corpus entry: the selector byte of reader ``kind`` (a file name of CALIB_KINDS), then the file."""
    return bytes([[k for k, _ in CALIB_KINDS].index(kind)]) + text.encode()


def json_bytes(value) -> bytes:
    return json.dumps(value, indent=1).encode()
