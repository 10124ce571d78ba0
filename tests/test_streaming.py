"""Pruning from disk, one block at a time: the streamed convert writes exactly what a run on the
model loaded whole writes, holds one block's weights at a time, checks every shard before any
work, and leaves nothing behind when the disk fills up."""

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atv_sparse.convert import main, run
from atv_sparse.formats import safetensors_io
from atv_sparse.formats.checkpoint import ShardWriter
from atv_sparse.models import adapter as adapter_mod
from atv_sparse.models.lazy import LazyWeights
from conftest import write_tiny_model
from atv_sparse.tinybench.families import FAMILIES, write_tiny_vlm

TEXT = ["--nsamples", "3", "--seqlen", "24", "--quiet"]
VLM = ["--nsamples", "2", "--quiet"]
PATTERNS = ("2:4", "4:8", "unstructured")
TEXT_METHODS = ("magnitude", "wanda", "sparsegpt")
VLM_METHODS = ("magnitude", "wanda", "sparsegpt", "atv", "tamp")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_llama, tiny_qwen2):
    base = tmp_path_factory.mktemp("stream")
    dirs = {"llama": tiny_llama, "qwen2": tiny_qwen2}
    dirs.update({fam: write_tiny_vlm(base / fam, fam) for fam in FAMILIES})
    return dirs


class WholeModel:
    """The reference: the model loaded whole by ``from_pretrained``, run by the same driver in memory."""

    def __init__(self, model):
        self.model, self.state = model, model.state_dict()

    def bring(self, module, device, skip=()):
        module.to(device)

    def free(self, module):
        module.to("cpu")

    def read(self, key):
        return self.state[key]


def convert_whole(monkeypatch, argv):
    def open_whole(self, model_dir, dtype="auto", tensors=None):
        model = self.load(model_dir, dtype)
        return model, WholeModel(model)

    with monkeypatch.context() as m:
        m.setattr(adapter_mod.ModelAdapter, "open_lazy", open_whole)
        return run(argv)


def output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "prune_report.json"}


def assert_same_output(a: Path, b: Path):
    left, right = output_bytes(a), output_bytes(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name] == right[name], name


def _grid():
    for fam in ("llama", "qwen2"):
        for method in TEXT_METHODS:
            for pattern in PATTERNS:
                yield fam, method, pattern
    for fam in FAMILIES:
        for method in VLM_METHODS:
            for pattern in PATTERNS:
                yield fam, method, pattern


@pytest.mark.parametrize("family,method,pattern", list(_grid()), ids=str)
def test_streamed_equals_whole_model(ckpts, family, method, pattern, tmp_path, monkeypatch):
    quick = TEXT if family in ("llama", "qwen2") else VLM
    # Both formats across the grid (the writer's two paths), each case once.
    fmt = "dense" if (method, pattern) in (("wanda", "4:8"), ("sparsegpt", "unstructured"), ("atv", "2:4"),
                                          ("magnitude", "2:4"), ("tamp", "unstructured")) else "packed"
    argv = [str(ckpts[family]), "--method", method, "--pattern", pattern, "--format", fmt, *quick]
    run([*argv, "--out", str(tmp_path / "streamed")])
    convert_whole(monkeypatch, [*argv, "--out", str(tmp_path / "whole")])
    assert_same_output(tmp_path / "streamed", tmp_path / "whole")


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16", "--max-shard-size", "60KB"],
                                   ["--method", "tamp", "--das", "--pattern", "unstructured"],
                                   ["--method", "wanda", "--calib-tokens", "abs"],
                                   ["--method", "wanda", "--calib-tokens", "dbs", "--format", "dense"],
                                   ["--targets", "re:model[.]language_model[.]layers[.].*",
                                    "multi_modal_projector.linear_1", "lm_head"]], ids=str)
def test_streamed_equals_whole_model_variants(ckpts, extra, tmp_path, monkeypatch):
    argv = [str(ckpts["llava_next"]), *extra, *VLM]
    run([*argv, "--out", str(tmp_path / "streamed")])
    convert_whole(monkeypatch, [*argv, "--out", str(tmp_path / "whole")])
    assert_same_output(tmp_path / "streamed", tmp_path / "whole")


def test_sharded_source_and_tied_head(tmp_path, monkeypatch, ckpts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(ckpts["qwen2"]).save_pretrained(src, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(ckpts["qwen2"]).save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists()
    argv = [str(src), "--method", "sparsegpt", "--pattern", "2:4", "--max-shard-size", "50KB", *TEXT]
    run([*argv, "--out", str(tmp_path / "streamed")])
    convert_whole(monkeypatch, [*argv, "--out", str(tmp_path / "whole")])
    assert_same_output(tmp_path / "streamed", tmp_path / "whole")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1


# --- one block at a time -------------------------------------------------------------------------

@pytest.mark.parametrize("family,argv", [
    ("llama", ["--method", "sparsegpt", "--targets", "re:model[.]layers[.].*", "lm_head"]),
    ("qwen2", ["--method", "magnitude"]),
    ("llava_next", ["--method", "atv"]),
    ("qwen2_vl", ["--method", "tamp", "--das", "--pattern", "unstructured"]),
    ("llava", ["--method", "wanda", "--calib-tokens", "abs"]),
], ids=str)
def test_one_block_materialised_at_a_time(ckpts, family, argv, tmp_path, monkeypatch):
    """Count materialised parameters after every ``bring``: never more than one decoder block's, and
    no block together with the embeddings or vision tower."""
    seen = []
    original = LazyWeights.bring

    def counting_bring(self, module, device, skip=()):
        original(self, module, device, skip)
        live = {k for k in self.live() if k in dict(self.model.named_parameters())}
        blocks = {k.split(".layers.")[1].split(".")[0] for k in live if ".layers." in k and "visual" not in k
                  and "vision" not in k}
        outside = {k for k in live if ".layers." not in k or "visual" in k or "vision" in k}
        seen.append((blocks, outside))
        assert len(blocks) <= 1, f"blocks {sorted(blocks)} materialised at once"
        assert not (blocks and outside - {"lm_head.weight", _norm_name(self.model)}), (blocks, sorted(outside)[:4])

    monkeypatch.setattr(LazyWeights, "bring", counting_bring)
    quick = TEXT if family in ("llama", "qwen2") else VLM
    run([str(ckpts[family]), *argv, *quick, "--out", str(tmp_path / "o")])
    visited = {b for blocks, _ in seen for b in blocks}
    assert visited == {"0", "1"}  # every block came, one at a time


def _norm_name(model):
    norm = model.get_decoder().norm
    return next(n for n, m in model.named_modules() if m is norm) + ".weight"


def test_blocks_are_freed(ckpts):
    from atv_sparse.models import adapter_for, read_config

    ckpt = ckpts["llava"]
    model, weights = adapter_for(read_config(ckpt), ckpt).open_lazy(ckpt)
    block = model.get_decoder().layers[1]
    weights.bring(block, torch.device("cpu"))
    assert all(not p.is_meta for p in block.parameters())
    assert all(p.is_meta for n, p in model.named_parameters() if ".layers.1." not in n)
    weights.free(block)
    assert all(p.is_meta for p in model.parameters()) and not weights.live()


# --- the writer ----------------------------------------------------------------------------------

SHARD_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool, torch.float64)


@pytest.mark.parametrize("max_bytes", [10**9, 700, 3000], ids=str)
def test_shard_writer_writes_what_save_file_writes(tmp_path, max_bytes):
    gen = torch.Generator().manual_seed(11)
    groups = []
    for i in range(9):
        dtype = SHARD_DTYPES[i % len(SHARD_DTYPES)]
        shape = (3 + i, 5) if i % 2 else (13,)
        t = (torch.randn(shape, generator=gen) * 50).to(dtype)
        groups.append({f"layer.{i}.w{'ab'[i % 2]}": t} if i % 3 else {f"m.{i}.weight_bitmask": t.to(torch.uint8).clone(),
                                                                      f"m.{i}.weight_values": t})
    tmp = tmp_path / "w"
    tmp.mkdir()
    writer = ShardWriter(tmp, max_bytes)
    for g in groups:
        writer.add(g)
    names = writer.finish()
    # The same grouping through safetensors itself.
    expected, shard, size = [], {}, 0
    for g in groups:
        nbytes = sum(t.numel() * t.element_size() for t in g.values())
        if shard and size + nbytes > max_bytes:
            expected.append(shard)
            shard, size = {}, 0
        shard.update(g)
        size += nbytes
    expected.append(shard)
    assert len(names) == len(expected)
    for name, tensors in zip(names, expected, strict=True):
        save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert (tmp / name).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), name
    assert not (tmp / ".spill").exists()


def test_disk_full_leaves_nothing(ckpts, tmp_path):
    """A real write failure (a file-size limit: the kernel refuses the write as a full disk would)."""
    out = tmp_path / "o"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from atv_sparse.convert import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(ckpts["llama"]), "--method", "wanda", *TEXT,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and str(out) in err[0], err
    assert os.listdir(tmp_path) == []


# --- bad checkpoints, found before any work ------------------------------------------------------

def fails(capsys, argv, *needles, root):
    before = sorted(str(p) for p in root.rglob("*"))
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert sorted(str(p) for p in root.rglob("*")) == before


@pytest.fixture
def sharded(tmp_path):
    src = write_tiny_model(tmp_path / "src", "llama")
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "ckpt"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(ckpt, max_shard_size="100KB")
    for f in src.iterdir():
        if "token" in f.name:
            shutil.copy(f, ckpt / f.name)
    shutil.rmtree(src)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return tmp_path, ckpt, index


def _write_index(ckpt, index):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_shard_named_in_index_but_missing(capsys, sharded):
    root, ckpt, index = sharded
    victim = sorted(set(index["weight_map"].values()))[1]
    (ckpt / victim).unlink()
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], victim, "missing", root=root)


def _drop_from_shard(ckpt, index, name):
    shard = ckpt / index["weight_map"][name]
    state = load_file(shard)
    del state[name]
    save_file(state, shard, metadata={"format": "pt"})


def test_tensor_absent_from_its_shard(capsys, sharded):
    root, ckpt, index = sharded
    name = "model.layers.1.mlp.up_proj.weight"
    _drop_from_shard(ckpt, index, name)
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], name, index["weight_map"][name], root=root)


def test_tensor_absent_from_the_checkpoint(capsys, sharded):
    root, ckpt, index = sharded
    name = "model.layers.0.self_attn.k_proj.weight"
    _drop_from_shard(ckpt, index, name)
    del index["weight_map"][name]
    _write_index(ckpt, index)
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], name, "absent", root=root)


def test_truncated_shard(capsys, sharded):
    root, ckpt, index = sharded
    victim = ckpt / sorted(set(index["weight_map"].values()))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], victim.name, "truncated", root=root)


def test_index_names_a_shard_twice(capsys, sharded):
    """The same file under a second name would be read twice: a path is refused as a shard name, and
    a second name for the same file (a link) holds every tensor of the first a second time."""
    root, ckpt, index = sharded
    shards = list(index["weight_map"].values())
    name, shard = next((k, v) for k, v in index["weight_map"].items() if shards.count(v) > 1)
    index["weight_map"][name] = "./" + shard
    _write_index(ckpt, index)
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], f"'./{shard}'", "expected the name of a .safetensors file",
          root=root)
    (ckpt / "alias.safetensors").symlink_to(shard)
    index["weight_map"][name] = "alias.safetensors"
    _write_index(ckpt, index)
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], "alias.safetensors", shard, "stored once", root=root)


def test_tensor_in_two_shards(capsys, sharded):
    root, ckpt, index = sharded
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    state = load_file(ckpt / shards[1])
    state[name] = load_file(ckpt / shards[0])[name]
    save_file(state, ckpt / shards[1], metadata={"format": "pt"})
    fails(capsys, [ckpt, "--out", root / "o", *TEXT], name, "stored once", root=root)


def test_every_source_header_parsed_once(sharded, monkeypatch):
    """One reader: convert parses each shard's header once (formats.checkpoint_tensors), and the lazy
    skeleton reads its tensors from that same map."""
    root, ckpt, index = sharded
    parsed = collections.Counter()
    real = safetensors_io.parse_json

    def counting(raw, what, *args, **kwargs):
        if what.endswith(": safetensors header") and Path(what.split(":")[0]).parent == ckpt:
            parsed[Path(what.split(":")[0]).name] += 1
        return real(raw, what, *args, **kwargs)

    monkeypatch.setattr(safetensors_io, "parse_json", counting)
    assert main([str(ckpt), "--method", "wanda", *TEXT, "--out", str(root / "o")]) == 0
    assert parsed == {name: 1 for name in set(index["weight_map"].values())}


def test_report_and_dry_run_give_the_streamed_peak(ckpts, tmp_path, capsys):
    summary = run([str(ckpts["llama"]), "--method", "sparsegpt", *TEXT, "--out", str(tmp_path / "o")])
    assert summary["peak_rss_bytes"] > 0
    assert "peak memory" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())
    assert report["peak_rss_bytes"] > 0
    # The estimate follows one block: twice the blocks, the same peak.
    deeper = write_tiny_model(tmp_path / "deeper", "llama", num_hidden_layers=4)
    two, four = (run([str(c), "--method", "sparsegpt", *TEXT, "--dry-run"]) for c in (ckpts["llama"], deeper))
    assert four["input_bytes"] > 1.4 * two["input_bytes"]
    assert four["peak_host_bytes"] == two["peak_host_bytes"] and four["peak_phase"] == "block"
