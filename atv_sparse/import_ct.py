"""``python -m atv_sparse.import_ct``: a compressed-tensors sparse checkpoint as an atv_sparse one.

    python -m atv_sparse.import_ct SRC --out DIR

SRC is a directory written by llm-compressor / compressed-tensors (<= 0.14) whose linears are
``sparse-24-bitmask``, ``sparse-bitmask``, or dense weights declared ``sparsity_structure: "2:4"``
(docs/design.md 6.1). Every compressed layer is checked against the declared structure (a group
of 4 holding more than 2 weights is an error naming the tensor, never a fall back to dense),
FP8 / INT8 weights are dequantized to the model's dtype, and the result is written shard by shard
as this package's compressed format, with the tokenizer, processor and generation files copied.
``sparse-bitmask`` layers declared unstructured become the unstructured format (dense
execution), which the report says. Headers, shapes and the declared scheme are checked before
anything is written; a value-level fault found while streaming removes the partial output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .cli import OneLineParser, flag_names
from .errors import AtvSparseError, with_flags
from .formats import compressed_tensors as ctf
from .formats.checkpoint import ShardWriter, parse_size
from .formats.safetensors_io import checkpoint_files
from .formats.staging import StagedOutputDir, check_output_dir, copy_aux_files
from .nn.load_ct import is_compressed_tensors_dir, open_ct
from .reports import peak_rss_bytes

REPORT_NAME = "import_report.json"
FLAGS = {"out_dir": "--out"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m atv_sparse.import_ct", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", metavar="SRC", help="compressed-tensors checkpoint directory (quant_method compressed-tensors)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (never replaced without --overwrite)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and import; returns the report (also written to ``import_report.json``)."""
    args = build_parser().parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    t0 = time.perf_counter()
    max_shard = parse_size(args.max_shard_size)
    if not is_compressed_tensors(src):
        raise AtvSparseError(f"{src / 'config.json'}: quantization_config.quant_method is not 'compressed-tensors'; "
                             "import_ct reads compressed-tensors checkpoints (python -m atv_sparse.convert prunes "
                             "a dense one)")
    source = open_ct(src)
    check_output_dir(out, args.overwrite, src)
    lines = _report_lines(source)
    with StagedOutputDir(out, args.overwrite, src) as stage:
        shards = ShardWriter(stage.tmp, max_shard)
        try:
            for group in source.translated():
                shards.add(group)
            names = shards.finish()
        finally:
            shards.close()
        copy_aux_files(src, stage.tmp, own={"config.json", REPORT_NAME})
        block = ctf.translated_block(source.ct, source.pattern, sorted(source.layers), __version__)
        config = ctf.translated_config(source.config, block)
        (stage.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        report = {"source": str(src), "out": str(out), "source_format": source.ct.sparsity_format,
                  "source_sparsity_structure": source.ct.structure, "pattern": str(source.pattern),
                  "layers": len(source.layers), "dequantized": source.ct.quant_summary or None,
                  "dropped_tensors": ctf.dropped_keys(source.headers, source.layers), "notes": lines,
                  "bytes_before": sum(f.stat().st_size for f in checkpoint_files(src)),
                  "bytes_after": sum((stage.tmp / n).stat().st_size for n in names), "files": names,
                  "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes(),
                  "version": __version__}
        (stage.tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        stage.commit()
    _print(report)
    return report


def is_compressed_tensors(src: Path) -> bool:
    if not (src / "config.json").is_file():
        from .formats.validate import read_config_json

        read_config_json(src)  # the error that says what is missing
    return is_compressed_tensors_dir(src)


def _report_lines(source) -> list[str]:
    kinds = sorted({layer.kind for layer in source.layers.values()})
    lines = [f"{len(source.layers)} linear(s) from {', '.join(kinds)} ({source.ct.structure}) -> atv_sparse "
             f"bitmask {source.pattern}"]
    if not source.pattern.is_nm:
        lines.append("unstructured: these layers run as dense matrices (atv_sparse's unstructured format keeps "
                     "the bitmask + values on disk and decompresses them; no sparse kernel speeds them up)")
    if source.ct.quant_summary:
        lines.append(f"dequantized to {source.dtype_of(next(iter(source.layers)))}: {source.ct.quant_summary}")
    return lines


def _print(report: dict) -> None:
    for line in report["notes"]:
        print(line)
    if report["dropped_tensors"]:
        print(f"dropped {len(report['dropped_tensors'])} quantization tensor(s) (scales of dequantized weights, "
              f"activation scales), e.g. {report['dropped_tensors'][0]}")
    mb = 1e6
    print(f"wrote {report['out']}: {report['bytes_before'] / mb:.2f} MB -> {report['bytes_after'] / mb:.2f} MB in "
          f"{len(report['files'])} shard(s), {report['seconds']:.1f} s, peak RSS {report['peak_rss_bytes'] / mb:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except AtvSparseError as e:
        flags = flag_names(build_parser()) | FLAGS
        print(f"error: {with_flags(str(e), flags)}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
