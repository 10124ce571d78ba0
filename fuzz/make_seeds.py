"""Write the seed corpus under fuzz/corpus/ (committed; run again only to change it).

    python fuzz/make_seeds.py

Seeds are small valid inputs of each target, so that mutations start from files the code
accepts: a packed shard (a 2:4 pair, an unstructured pair, a dense bf16 tensor) and a dense one;
config.json of the bundled tiny VLM converted to 2:4 (both quantization_config copies) and of
a text model, unstructured; one calibration file of each kind, pointing at the images that
targets.py lays out beside it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import targets
from atv_sparse.formats.bitmask import compress
from atv_sparse.formats.spec import build_quantization_config
from atv_sparse.patterns import parse_pattern


def packed_shard() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 16, generator=g)
    scores = torch.rand(4, 4, 4, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True).reshape(4, 16)
    mask24, values24 = compress(w, keep, 2, 4)
    keep_u = torch.rand(3, 12, generator=g) < 0.4
    mask_u, values_u = compress(torch.randn(3, 12, generator=g).half(), keep_u)
    return {"model.layers.0.mlp.up_proj.weight_bitmask": mask24, "model.layers.0.mlp.up_proj.weight_values": values24,
            "model.layers.0.mlp.down_proj.weight_bitmask": mask_u,
            "model.layers.0.mlp.down_proj.weight_values": values_u,
            "model.norm.weight": torch.randn(6, generator=g).bfloat16()}


def main() -> int:
    corpus = targets.CORPUS
    shutil.rmtree(corpus, ignore_errors=True)
    for target in targets.TARGETS:
        (corpus / target).mkdir(parents=True)
    save_file(packed_shard(), corpus / "header" / "packed.safetensors", metadata={"format": "pt"})
    g = torch.Generator().manual_seed(1)
    save_file({"a": torch.randint(0, 9, (2, 3), generator=g), "b": torch.randn(5, generator=g).double(),
                 "c": torch.zeros(0, 4), "d": torch.tensor(True)}, corpus / "header" / "dense.safetensors")

    from atv_sparse.convert import main as convert
    from atv_sparse.tinybench.model import bundled_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        assert convert([str(bundled_model_dir()), "--out", f"{tmp}/o", "--method", "magnitude", "--quiet"]) == 0
        vlm = json.loads(Path(f"{tmp}/o/config.json").read_text())
    vlm["_name_or_path"] = "tiny_vlm"
    (corpus / "config" / "vlm-2of4.json").write_bytes(targets.json_bytes(vlm))
    text = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "quantization_config": build_quantization_config(
                parse_pattern("unstructured", 0.6), "wanda", {"nsamples": 4, "seqlen": 32}, ["re:model[.]layers[.].*"],
                ["model.layers.0.mlp.down_proj", "re:.*[.]k_proj"], "0.1.0")}
    (corpus / "config" / "llama-unstructured.json").write_bytes(targets.json_bytes(text))
    (corpus / "config" / "dense.json").write_bytes(targets.json_bytes({"architectures": ["LlamaForCausalLM"]}))

    calib = corpus / "calib"
    (calib / "text.txt").write_bytes(targets.calib_seed("calib.txt", "A short text.\nAnother line.\n"))
    (calib / "text.jsonl").write_bytes(targets.calib_seed("calib.jsonl", '{"text": "one"}\n{"text": "two"}\n'))
    records = [{"image": "img/ok.png", "text": "<image>\nA red square."}, {"text": "Text only."},
               {"image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                         {"from": "gpt", "value": "Red."}]}]
    (calib / "mm.jsonl").write_bytes(targets.calib_seed("mm.jsonl", "\n".join(json.dumps(r) for r in records)))
    (calib / "sharegpt4v.json").write_bytes(targets.calib_seed("sharegpt4v.json", json.dumps(records[1:], indent=1)))
    for p in sorted(corpus.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(corpus.parent)}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
