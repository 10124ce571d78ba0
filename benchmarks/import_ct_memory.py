"""Peak memory of ``python -m atv_sparse.import_ct`` on a checkpoint larger than half the RAM.

    python benchmarks/import_ct_memory.py --work /tmp/ct-big [--shape llama-2-13b]

Writes a synthetic compressed-tensors ``sparse-24-bitmask`` checkpoint of a real model's shapes
(bf16; valid 2:4 bitmasks and random values, written here: compressed-tensors itself would need
the dense model in memory, twice the size), imports it in a subprocess, and records the import's
peak resident memory (``ru_maxrss``, from import_report.json) beside the input size and the
machine's RAM in benchmarks/results/import_ct_memory.{json,md}. The tensor layout is the one
tests/test_import_ct.py checks against compressed-tensors 0.14.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from atv_sparse.formats.shard_io import safetensors_header

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    "smoke": (64, 128, 2, 4, 2, 512),  # seconds; for checking the script itself
}
SHARD = 5 * 10**9
RESULTS = Path(__file__).parent / "results"


def tensors(hidden, inter, layers, heads, kv, vocab):
    """(name, dtype, shape, kind) in the order transformers saves a Llama."""
    head_dim = hidden // heads
    out = [("model.embed_tokens.weight", "BF16", [vocab, hidden], "values")]
    for i in range(layers):
        p = f"model.layers.{i}"
        linears = [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", kv * head_dim, hidden),
                   ("self_attn.v_proj", kv * head_dim, hidden), ("self_attn.o_proj", hidden, hidden),
                   ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden), ("mlp.down_proj", hidden, inter)]
        out.append((f"{p}.input_layernorm.weight", "BF16", [hidden], "ones"))
        out.append((f"{p}.post_attention_layernorm.weight", "BF16", [hidden], "ones"))
        for name, o, n in linears:
            out += [(f"{p}.{name}.bitmask", "U8", [o, n // 8], "bitmask"),
                    (f"{p}.{name}.compressed", "BF16", [o, n // 2], "values"),
                    (f"{p}.{name}.shape", "I64", [2, 1], [o, n])]
    out += [("model.norm.weight", "BF16", [hidden], "ones"), ("lm_head.weight", "BF16", [vocab, hidden], "values")]
    return out


def blocks():
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(8 << 20, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    nibbles = [a | b for a in (1, 2, 4, 8) for b in (1, 2, 4, 8) if a < b]  # the 6 ways to keep 2 of 4
    table = torch.tensor([lo | hi << 4 for lo in nibbles for hi in nibbles], dtype=torch.uint8)
    bitmask = table[torch.randint(len(table), (16 << 20,), generator=g)].numpy().tobytes()
    ones = torch.ones(1 << 20, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return {"values": values, "bitmask": bitmask, "ones": ones}


def write_checkpoint(out: Path, shape: str) -> int:
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    items = tensors(hidden, inter, layers, heads, kv, vocab)
    size = {"BF16": 2, "U8": 1, "I64": 8}
    shards, current, used = [], [], 0
    for item in items:
        nbytes = size[item[1]] * (item[2][0] * (item[2][1] if len(item[2]) > 1 else 1))
        if current and used + nbytes > SHARD:
            shards.append(current)
            current, used = [], 0
        current.append((*item, nbytes))
        used += nbytes
    shards.append(current)
    out.mkdir(parents=True, exist_ok=True)
    data, weight_map, total = blocks(), {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, ordered = safetensors_header([(n, d, s, b) for n, d, s, _, b in shard], {"format": "pt"})
        kinds = {n: k for n, _, _, k, _ in shard}
        with open(out / fname, "wb") as f:
            f.write(header)
            for name, _, _, nbytes in ordered:
                kind = kinds[name]
                if isinstance(kind, list):
                    f.write(torch.tensor(kind, dtype=torch.int64).numpy().tobytes())
                    continue
                block, done = data[kind], 0
                while done < nbytes:
                    n = min(len(block), nbytes - done)
                    f.write(block[:n])
                    done += n
                weight_map[name] = fname
        total += (out / fname).stat().st_size
        weight_map.update({n: fname for n, *_ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "transformers_version": "4.57.6",
              "quantization_config": {"quant_method": "compressed-tensors", "version": "0.14.0.1",
                                      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                                                          "targets": ["Linear"], "ignore": ["lm_head"],
                                                          "global_sparsity": 0.45,
                                                          "registry_requires_subclass": False},
                                      "transform_config": {}}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch directory (needs about twice the checkpoint)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama-2-13b")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--results", type=Path, default=RESULTS, help="where import_ct_memory.{json,md} go")
    args = p.parse_args()
    src, out = args.work / "ct", args.work / "imported"
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    size = write_checkpoint(src, args.shape)
    written = time.perf_counter() - t0
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cmd = [sys.executable, "-m", "atv_sparse.import_ct", str(src), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "import_report.json").read_text())
    check = subprocess.run([sys.executable, "-c", "import sys; from atv_sparse.formats.validate import "
                            "validate_checkpoint; validate_checkpoint(sys.argv[1])", str(out)], check=True)
    result = {"shape": args.shape, "input_bytes": size, "output_bytes": report["bytes_after"], "ram_bytes": ram,
              "peak_rss_bytes": report["peak_rss_bytes"], "import_seconds": round(seconds, 1),
              "write_input_seconds": round(written, 1), "layers": report["layers"],
              "output_validated": check.returncode == 0, "machine": f"{platform.node()} {os.cpu_count()} cores",
              "python": platform.python_version(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "command": f"python benchmarks/import_ct_memory.py --work {args.work} --shape {args.shape}"}
    args.results.mkdir(exist_ok=True)
    (args.results / "import_ct_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    (args.results / "import_ct_memory.md").write_text(
        "# Peak memory of import_ct on a checkpoint larger than half the RAM\n\n"
        f"Made by `{result['command']}` on {result['date']} ({result['machine']}, Python {result['python']}, "
        f"torch {result['torch']}).\n\n"
        "| shape | input (sparse-24-bitmask, bf16) | output | RAM | peak RSS of the import | time |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"| {args.shape} ({result['layers']} linears) | {size / gb:.1f} GB | {result['output_bytes'] / gb:.1f} GB | "
        f"{ram / gb:.1f} GB | **{result['peak_rss_bytes'] / gb:.2f} GB** | {seconds:.0f} s |\n\n"
        "The input is synthetic (valid 2:4 bitmasks, random bf16 values, written by this script in the layout "
        "compressed-tensors 0.14.0.1 writes; tests/test_import_ct.py checks that layout against the library); "
        "compressed-tensors itself would need the dense model in memory to write it. Peak RSS is the import "
        "process's ru_maxrss; the page cache is not counted. The output passed `validate_checkpoint`.\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
