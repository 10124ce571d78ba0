"""Peak resident memory of ``atv_sparse.convert`` on checkpoints with real shapes (random weights).

    python benchmarks/prune_memory.py build --shape llama-3-8b --dir /data/ckpts
    python benchmarks/prune_memory.py run --shape llama-3-8b --dir /data/ckpts --method wanda --out-root /data/out
    python benchmarks/prune_memory.py table            # results/prune_memory.json -> results/prune_memory.md

``build`` writes a random-weight bf16 checkpoint shard by shard (one shard of tensors in memory at
a time, never the model) with a tiny tokenizer, so a checkpoint larger than RAM can be made.
``run`` converts it in a child process (``--pattern 2:4``, small calibration) and records wall
time, the child's peak resident set size (``wait4``'s ru_maxrss: every page the process ever held,
file-backed pages included) and that peak as a fraction of the checkpoint's size, appended to
``results/prune_memory.json`` with the machine. ``atv_sparse.load`` of the output is measured the
same way (``--load``). Shapes are the published configs with a 32k vocabulary (Llama-2's
tokenizer size), as measured in issue 19.
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
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "prune_memory.json"

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, tied embeddings
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, tie_word_embeddings=False),
}
VOCAB = 32000
SHARD_BYTES = 2 * 10**9


def build(shape: str, out: Path, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM checkpoint (bf16, std 0.02, norms 1) with a tiny tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from atv_sparse.calib import default_calibration_text
    from atv_sparse.tinybench.tokenizer import train_tiny_tokenizer

    dims = SHAPES[shape]
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=5e5,
                         bos_token_id=0, eos_token_id=1, dtype="bfloat16", architectures=["LlamaForCausalLM"], **dims)
    h, i, L = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    tensors = [("model.embed_tokens.weight", (VOCAB, h))]
    for b in range(L):
        p = f"model.layers.{b}."
        tensors += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
    tensors.append(("model.norm.weight", (h,)))
    if not dims["tie_word_embeddings"]:
        tensors.append(("lm_head.weight", (VOCAB, h)))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards, shard, nbytes = [], {}, 0

    def flush():
        nonlocal shard, nbytes
        if shard:
            name = f"part-{len(shards)}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, nbytes = {}, 0

    for name, size in tensors:
        if len(size) == 1:
            t = torch.ones(size, dtype=torch.bfloat16)
        else:
            t = (torch.randn(size, generator=gen) * 0.02).to(torch.bfloat16)
        if shard and nbytes + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
        nbytes += t.numel() * 2
    flush()
    weight_map, total = {}, 0
    for k, (name, keys) in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / name, tmp / final)
        total += (tmp / final).stat().st_size
        weight_map.update({key: final for key in keys})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    train_tiny_tokenizer(default_calibration_text(), ["<s>", "</s>"]).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


def measured(cmd: list[str], log: Path, pythonpath: str | None = None) -> tuple[int, float, int]:
    """Run ``cmd``; return (exit status, wall seconds, peak RSS bytes of that child)."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # Another source tree runs from a neutral directory: the repo root would shadow packages.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=tempfile.gettempdir() if pythonpath else None)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024


def machine() -> dict:
    import torch

    cpu = "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "python": platform.python_version(),
            "torch": torch.__version__}


def run(args) -> dict:
    ckpt = args.dir / args.shape
    out = args.out_root / f"{args.shape}-{args.method}-{args.pattern.replace(':', 'of')}-{args.label}"
    log = args.out_root / f"{out.name}.log"
    cmd = [sys.executable, "-m", "atv_sparse.convert", str(ckpt), "--method", args.method, "--pattern", args.pattern,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--out", str(out),
           "--overwrite", "--quiet"]
    status, wall, peak = measured(cmd, log, args.pythonpath)
    size = checkpoint_bytes(ckpt)
    row = {"code": args.label, "shape": args.shape, "method": args.method, "pattern": args.pattern, "nsamples": args.nsamples,
           "seqlen": args.seqlen, "status": status, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
           "checkpoint_bytes": size, "peak_over_checkpoint": round(peak / size, 4),
           "output_bytes": checkpoint_bytes(out) if status == 0 else None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "log_tail": log.read_text()[-1500:]}
    if status == 0 and args.load:
        load_log = args.out_root / f"{out.name}.load.log"
        code = ("import sys, atv_sparse; m = atv_sparse.load(sys.argv[1], progress=False); "
                "print(sum(p.numel() for p in m.parameters()))")
        lstatus, lwall, lpeak = measured([sys.executable, "-c", code, str(out)], load_log)
        row.update(load_status=lstatus, load_wall_s=round(lwall, 1), load_peak_rss_bytes=lpeak,
                   load_peak_over_output=round(lpeak / row["output_bytes"], 4))
    if status == 0 and args.validate:
        row["validated_linears"] = validate(out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "machine")}))
    return row


def validate(out: Path, in_features: dict[str, int] | None = None) -> int:
    """The loader's checks on a packed output, one module at a time (a 13B output is not loaded whole
    on this machine): config block, every header, then ``validate_compressed`` per pruned linear
    (dtypes, shapes, N:M groups, popcounts). Returns the number of linears checked."""
    from safetensors import safe_open

    from atv_sparse.formats.bitmask import validate_compressed
    from atv_sparse.formats.safetensors_io import checkpoint_files, checkpoint_tensors
    from atv_sparse.formats.spec import check_quantization_config

    config = json.loads((out / "config.json").read_text())
    pattern = check_quantization_config(config["quantization_config"], str(out / "config.json"))
    tensors = checkpoint_tensors(checkpoint_files(out))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    checked = 0
    for key, (path, _) in tensors.items():
        if not key.endswith(".weight_bitmask"):
            continue
        name = key.removesuffix(".weight_bitmask")
        with safe_open(path, "pt") as f:
            bitmask = f.get_tensor(key)
        with safe_open(tensors[f"{name}.weight_values"][0], "pt") as f:
            values = f.get_tensor(f"{name}.weight_values")
        validate_compressed(name, bitmask, values, bitmask.shape[0], inter if "down_proj" in name else hidden,
                            pattern.n, pattern.m)
        checked += 1
    return checked


def table() -> str:
    rows = json.loads(RESULTS.read_text())
    m = rows[-1]["machine"]
    gb = 1e9
    lines = [f"# Pruning memory (python -m atv_sparse.convert, --device cpu)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, torch {m['torch']}, "
             "shared with other jobs (wall times are indicative). Peak = the convert process's ru_maxrss. "
             "Random-weight bf16 checkpoints with the named model's shapes and a 32k vocabulary.", "",
             "| code | shape | method | calibration | checkpoint | peak RSS | peak / checkpoint | wall | output | "
             "load peak | load peak / output |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("note"):  # a run stopped on purpose: its peak so far, and why
            lines.append(f"| {r['code']} | {r['shape']} | {r['method']} {r['pattern']} | {r['nsamples']} x {r['seqlen']} | "
                         f"{r['checkpoint_bytes'] / gb:.2f} GB | {r['peak_rss_bytes'] / gb:.2f} GB | "
                         f"{100 * r['peak_over_checkpoint']:.1f}% | {r['note']} | | | |")
            continue
        if r["status"] != 0:
            lines.append(f"| {r['code']} | {r['shape']} | {r['method']} {r['pattern']} | {r['nsamples']} x {r['seqlen']} | "
                         f"{r['checkpoint_bytes'] / gb:.2f} GB | failed (exit {r['status']}) | | | | | |")
            continue
        load = (f"{r['load_peak_rss_bytes'] / gb:.2f} GB | {100 * r['load_peak_over_output']:.0f}%"
                if "load_peak_rss_bytes" in r else "- | -")
        lines.append(f"| {r['code']} | {r['shape']} | {r['method']} {r['pattern']} | {r['nsamples']} x {r['seqlen']} | "
                     f"{r['checkpoint_bytes'] / gb:.2f} GB | {r['peak_rss_bytes'] / gb:.2f} GB | "
                     f"{100 * r['peak_over_checkpoint']:.1f}% | {r['wall_s'] / 60:.1f} min | "
                     f"{r['output_bytes'] / gb:.2f} GB | {load} |")
    text = "\n".join(lines) + "\n"
    (RESULTS.with_suffix(".md")).write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random-weight checkpoint with real shapes")
    b.add_argument("--shape", choices=tuple(SHAPES), required=True)
    b.add_argument("--dir", type=Path, required=True)
    r = sub.add_parser("run", help="convert one checkpoint and record time and peak memory")
    r.add_argument("--shape", choices=tuple(SHAPES), required=True)
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--out-root", type=Path, required=True)
    r.add_argument("--method", choices=("wanda", "sparsegpt"), default="wanda")
    r.add_argument("--pattern", default="2:4")
    r.add_argument("--nsamples", type=int, default=4)
    r.add_argument("--seqlen", type=int, default=128)
    r.add_argument("--load", action="store_true", help="also measure atv_sparse.load of the output")
    r.add_argument("--keep", action="store_true", help="keep the output directory")
    r.add_argument("--validate", action="store_true",
                   help="run the loader's checks on the output module by module (for outputs too large to load)")
    r.add_argument("--label", default="streamed", help="which code ran (the table's first column)")
    r.add_argument("--pythonpath", default=None,
                   help="run atv_sparse from this source tree instead (an older version, for comparison)")
    sub.add_parser("table", help="results/prune_memory.json -> results/prune_memory.md")
    args = p.parse_args()
    if args.cmd == "build":
        print(build(args.shape, args.dir / args.shape))
    elif args.cmd == "run":
        args.out_root.mkdir(parents=True, exist_ok=True)
        run(args)
    else:
        print(table())


if __name__ == "__main__":
    main()
