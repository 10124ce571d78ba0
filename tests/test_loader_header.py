"""Malformed safetensors headers and indexes: each case one AtvSparseError naming the file (and tensor).

Files are written by the project's own shard writer from fresh random tensors, then one header
field is edited and the file rewritten with the same data. A header the checker accepts must
load in safetensors itself (the checker may be stricter, never looser).
"""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file
from safetensors import safe_open

import atv_sparse
from atv_sparse.convert import main
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.safetensors_io import INDEX_NAME, checkpoint_files, checkpoint_tensors, read_header


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight_values": torch.randn(13, 6, generator=g),
            "a.weight_bitmask": torch.randint(0, 256, (13, 2), dtype=torch.uint8, generator=g),
            "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.empty": torch.zeros(0, 3)}


def split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite(path, header=None, data=None, header_bytes=None):
    old_header, old_data = split(path)
    text = header_bytes if header_bytes is not None else json.dumps(old_header if header is None else header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + (old_data if data is None else data))


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(random_tensors(0), path, metadata={"format": "pt"})
    return path


def test_valid_shard_reads_and_loads(shard):
    header = read_header(shard)
    assert set(header) == set(random_tensors(0))
    with safe_open(shard, "pt") as f:
        for name, tensor in random_tensors(0).items():
            assert torch.equal(f.get_tensor(name), tensor)


def edit(name, key, value):
    def change(header):
        header[name][key] = value
    return change


HEADER_CASES = [
    ("dtype unknown", edit("b.bias", "dtype", "F12"), "b.bias: unknown dtype 'F12'"),
    ("dtype a number", edit("b.bias", "dtype", 16), "b.bias: unknown dtype"),
    ("shape a string", edit("b.bias", "shape", "7"), "b.bias: shape 7 is not a list"),
    ("shape negative", edit("b.bias", "shape", [-7]), "b.bias: shape"),
    ("shape a bool", edit("b.bias", "shape", [True, 7]), "b.bias: shape"),
    ("shape a float", edit("b.bias", "shape", [7.0]), "b.bias: shape"),
    ("shape past u64", edit("c.empty", "shape", [0, 2**64]), "c.empty: shape"),
    ("shape product huge", edit("b.bias", "shape", [2**62, 2**62]), "b.bias: spans"),
    ("offsets of strings", edit("b.bias", "data_offsets", ["0", 14]), "b.bias: data_offsets"),
    ("offsets reversed", edit("b.bias", "data_offsets", [14, 0]), "b.bias: data_offsets"),
    ("offsets three", edit("b.bias", "data_offsets", [0, 7, 14]), "b.bias: data_offsets"),
    ("offsets None", edit("b.bias", "data_offsets", None), "b.bias: data_offsets"),
    ("size mismatch", edit("a.weight_bitmask", "shape", [13, 3]), "a.weight_bitmask: spans 26 bytes"),
    ("entry a list", lambda h: h.__setitem__("b.bias", [1, 2]), "b.bias: malformed header entry"),
    ("entry missing key", lambda h: h["b.bias"].pop("dtype"), "b.bias: malformed header entry"),
    ("entry extra key", edit("b.bias", "offset", 3), "b.bias: malformed header entry"),
    ("metadata not strings", lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__"),
    ("metadata a list", lambda h: h.__setitem__("__metadata__", ["pt"]), "__metadata__"),
]


def shift(name, delta):
    def change(header):
        header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]
    return change


@pytest.mark.parametrize("case,change,words", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_malformed_entry_names_file_and_tensor(shard, case, change, words):
    header, _ = split(shard)
    change(header)
    rewrite(shard, header)
    with pytest.raises(AtvSparseError) as e:
        read_header(shard)
    assert str(shard) in str(e.value) and words in str(e.value)


def test_overlap_gap_and_past_the_end(shard):
    header, data = split(shard)
    first = min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    for change, words in [(shift(last, -2), "overlap"), (shift(first, 2), "belong to no tensor"),
                          (shift(last, 4), "ends at byte")]:
        h = json.loads(json.dumps(header))
        change(h)
        rewrite(shard, h, data)
        with pytest.raises(AtvSparseError, match=words):
            read_header(shard)
    rewrite(shard, header, data + b"\0" * 8)
    with pytest.raises(AtvSparseError, match="8 bytes after the last tensor belong to no tensor"):
        read_header(shard)


@pytest.mark.parametrize("header_bytes,words", [
    (b"[1, 2]", "does not start with"),
    (b"  {}", "does not start with"),
    (b"{\"a\": ", "not valid UTF-8 JSON"),
    (b"{\"a\xff\": 1}", "not valid UTF-8 JSON"),
    (b"{\"a\": " + b"[" * 100000, "nested too deeply"),
    (b"{\"a\": " + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),
    (b"{\"x\": {}, \"x\": {}}", "appears twice"),
    (b"{\"x\": NaN}", "not valid UTF-8 JSON"),
    (b"{\"__metadata__\": {\"format\": \"\\ud800\"}}", "not valid UTF-8 JSON"),  # safetensors refuses it too
], ids=["list", "space", "cut", "utf8", "deep", "digits", "dup", "nan", "lone-surrogate"])
def test_unreadable_header_json(shard, header_bytes, words):
    rewrite(shard, header_bytes=header_bytes, data=b"")
    with pytest.raises(AtvSparseError, match=words) as e:
        read_header(shard)
    assert str(shard) in str(e.value)


def test_header_length_field(shard, tmp_path):
    raw = shard.read_bytes()
    for content, words in [(raw[:5], "not a safetensors file"),
                           (struct.pack("<Q", 2**64 - 1) + raw[8:], "runs past the end"),
                           (struct.pack("<Q", len(raw)) + raw[8:], "runs past the end")]:
        shard.write_bytes(content)
        with pytest.raises(AtvSparseError, match=words):
            read_header(shard)
    big = tmp_path / "big.safetensors"  # sparse file: 200 MB on paper, nothing on disk
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(200_000_000)
    with pytest.raises(AtvSparseError, match="larger than safetensors allows"):
        read_header(big)


def write_sharded(root, seed=1):
    tensors = random_tensors(seed)
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, root / fname, metadata={"format": "pt"})
    weight_map = {k: fname for fname, keys in parts.items() for k in keys}
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def set_index(root, weight_map):
    (root / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


def test_index_and_headers_agree(tmp_path):
    weight_map = write_sharded(tmp_path)
    assert set(checkpoint_tensors(checkpoint_files(tmp_path))) == set(weight_map)
    first = sorted(weight_map)[0]
    cases = [({**weight_map, first: "../../etc/model.safetensors"}, "expected the name of a .safetensors file"),
             ({**weight_map, first: "/tmp/x.safetensors"}, "expected the name of a .safetensors file"),
             ({**weight_map, first: 5}, "expected the name of a .safetensors file"),
             ({**weight_map, first: "model-00002-of-00002.safetensors"}, "places it in"),
             ({k: v for k, v in weight_map.items() if k != first}, "does not list it"),
             ({**weight_map, "ghost.weight": "model-00001-of-00002.safetensors"}, "ghost.weight is listed"),
             ({}, "weight_map")]
    for index, words in cases:
        set_index(tmp_path, index)
        with pytest.raises(AtvSparseError, match=words):
            checkpoint_tensors(checkpoint_files(tmp_path))
    (tmp_path / INDEX_NAME).write_text("{\"weight_map\": ")
    with pytest.raises(AtvSparseError, match="index.json: not valid UTF-8 JSON"):
        checkpoint_files(tmp_path)


def test_tensor_in_two_shards_is_refused(tmp_path):
    weight_map = write_sharded(tmp_path)
    name = sorted(weight_map)[0]
    other = "model-00002-of-00002.safetensors"
    tensors = {k: v for k, v in random_tensors(1).items() if weight_map[k] == other}
    save_file({**tensors, name: random_tensors(1)[name]}, tmp_path / other)
    with pytest.raises(AtvSparseError, match=f"tensor {name} is also in"):
        checkpoint_tensors(checkpoint_files(tmp_path))


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("hdr") / "packed"
    assert main([str(tiny_llama), "--out", str(out), "--method", "magnitude", "--quiet"]) == 0
    return out


def test_load_refuses_wrong_type_header_field(packed, tmp_path):
    """The issue's raw ``TypeError: '>' not supported between 'str' and 'int'``, now named."""
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    path = bad / "model.safetensors"
    header, data = split(path)
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin, str(end)]
    rewrite(path, header, data)
    with pytest.raises(AtvSparseError, match="model.safetensors: tensor model.norm.weight: data_offsets"):
        atv_sparse.load(bad)


def test_load_refuses_renamed_tensor(packed, tmp_path):
    """A damaged name would leave the real parameter random, with only a warning from transformers."""
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    path = bad / "model.safetensors"
    raw = path.read_bytes()
    assert raw.count(b'"model.norm.weight"') == 1
    path.write_bytes(raw.replace(b'"model.norm.weight"', b'"model.norx.weight"'))
    with pytest.raises(AtvSparseError, match="tensor model.norm.weight: the model needs it"):
        atv_sparse.load(bad)
