"""Integrity hashes: the shard writer equals safetensors byte for byte, hashes what it writes, and
``verify`` names the shard when any byte of it changes."""

import hashlib
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

import atv_sparse
from atv_sparse.convert import main
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.safetensors_io import data_start, read_header, read_tensor
from atv_sparse.formats.checkpoint import ShardWriter
from atv_sparse.formats.dtypes import DTYPE_BYTES, DTYPE_NAMES, SAFETENSORS_DTYPES
from atv_sparse.formats.shard_io import CHECKSUMS_NAME
from atv_sparse.formats.verify import verify_checkpoint
from atv_sparse.verify import main as verify_main

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.uint16,
          torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.complex64, torch.float64,
          torch.int64, torch.uint64]
NAMES = ["a", "b.weight", "z", "é.ü", 'quo"te', "tab\tname", "model.layers.10.mlp", "model.layers.9.mlp"]


def random_tensor(dtype, shape, g):
    return torch.randint(0, 256, (*shape, torch.empty((), dtype=dtype).element_size()), dtype=torch.uint8,
                         generator=g).view(dtype).reshape(shape)


@pytest.mark.parametrize("seed", range(4))
def test_shard_bytes_equal_safetensors_and_digest_is_sha256(tmp_path, seed):
    """The streaming writer's shard is save_file's file byte for byte; its recorded digest is hashlib's."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    tensors = {}
    for i, name in enumerate(NAMES + [f"t{k}" for k in range(12)]):
        shape = [rng.choice([0, 1, 3, 13]) for _ in range(rng.randint(0, 3))]
        tensors[name] = random_tensor(rng.choice(DTYPES), shape, g)
    writer = ShardWriter(tmp_path, 1 << 40)
    writer.add(tensors)
    assert writer.finish() == ["model.safetensors"]
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"format": "pt"})
    ours = (tmp_path / "model.safetensors").read_bytes()
    assert ours == theirs.read_bytes()
    recorded = json.loads((tmp_path / CHECKSUMS_NAME).read_text())["files"]["model.safetensors"]
    assert recorded == {"sha256": hashlib.sha256(ours).hexdigest(), "bytes": len(ours)}


def test_one_dtype_table_names_what_safetensors_writes(tmp_path):
    """formats/dtypes.py against safetensors itself: every dtype it writes is in the table under the
    name in the header, with its element size, and the lazy reader reads its bytes back."""
    g = torch.Generator().manual_seed(0)
    assert sorted(SAFETENSORS_DTYPES.values(), key=str) == sorted(DTYPES, key=str)
    for dtype in DTYPES:
        tensor = random_tensor(dtype, [3, 5], g)
        path = tmp_path / "one.safetensors"
        save_file({"t": tensor}, path)
        info = read_header(path)["t"]
        assert info["dtype"] == DTYPE_NAMES[dtype] and SAFETENSORS_DTYPES[info["dtype"]] == dtype
        assert DTYPE_BYTES[info["dtype"]] == tensor.element_size()
        back = read_tensor(path, data_start(path), info)
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("verify")
    out = {"single": base / "single", "sharded": base / "sharded"}
    assert main([str(tiny_llama), "--out", str(out["single"]), "--method", "magnitude", "--quiet"]) == 0
    assert main([str(tiny_llama), "--out", str(out["sharded"]), "--method", "magnitude", "--quiet",
                 "--max-shard-size", "60KB"]) == 0
    return out


def shards(directory):
    return sorted(directory.glob("*.safetensors"))


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_every_shard_recorded_and_verified(checkpoints, kind, capsys):
    ckpt = checkpoints[kind]
    recorded = json.loads((ckpt / CHECKSUMS_NAME).read_text())["files"]
    assert sorted(recorded) == [p.name for p in shards(ckpt)] and (len(recorded) > 2) == (kind == "sharded")
    for path in shards(ckpt):
        assert recorded[path.name] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                       "bytes": path.stat().st_size}
    assert verify_checkpoint(ckpt) == {name: e["sha256"] for name, e in recorded.items()}
    assert verify_main([str(ckpt)]) == 0 and capsys.readouterr().out.startswith(f"ok: {len(recorded)} shard(s)")


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_flipped_byte_anywhere_names_the_shard(checkpoints, tmp_path, kind, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints[kind], bad)
    rng = random.Random(kind)
    for path in shards(bad):
        original = path.read_bytes()
        # first and last byte, the header, and seeded positions all over the data
        positions = [0, 8, len(original) // 2, len(original) - 1] + [rng.randrange(len(original)) for _ in range(6)]
        for position in positions:
            damaged = bytearray(original)
            damaged[position] ^= 1 << rng.randrange(8)
            path.write_bytes(damaged)
            with pytest.raises(AtvSparseError, match=f"{path.name}: SHA-256 .* differs"):
                verify_checkpoint(bad)
        path.write_bytes(original)
    verify_checkpoint(bad)
    assert verify_main([str(bad)]) == 0
    capsys.readouterr()


def test_flipped_value_loads_without_verify_and_is_caught_with_it(checkpoints, tmp_path):
    from safetensors import safe_open

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["single"], bad)
    path = bad / "model.safetensors"
    with safe_open(path, "pt") as f:
        name = "model.layers.0.mlp.up_proj.weight_values"
        raw = path.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        begin = read_header(path)[name]["data_offsets"][0]
        before = f.get_tensor(name).clone()  # the file changes below, and safetensors may map it
    raw = bytearray(raw)
    raw[8 + header_len + begin + 1] ^= 0x01  # low mantissa bit of the first kept value: still a valid float
    path.write_bytes(raw)
    model = atv_sparse.load(bad, progress=False)  # nothing else can tell a damaged value from a real one
    assert not torch.equal(model.get_submodule("model.layers.0.mlp.up_proj").weight_values, before)
    with pytest.raises(AtvSparseError, match="model.safetensors: SHA-256 .* differs"):
        atv_sparse.load(bad, verify=True, progress=False)


def test_verify_refusals(checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["sharded"], bad)
    last = shards(bad)[-1]
    last.write_bytes(last.read_bytes()[:-3])
    with pytest.raises(AtvSparseError, match=f"{last.name}: .* bytes, {CHECKSUMS_NAME} recorded"):
        verify_checkpoint(bad)
    record = json.loads((bad / CHECKSUMS_NAME).read_text())
    del record["files"][last.name]
    (bad / CHECKSUMS_NAME).write_text(json.dumps(record))
    with pytest.raises(AtvSparseError, match=f"{last.name}: not listed in {CHECKSUMS_NAME}"):
        verify_checkpoint(bad)
    for garbage in ['{"algorithm": "md5", "files": {}}', '{"algorithm": "sha256", "files": {"../x": {}}}',
                    '{"algorithm": "sha256", "files": {"a": {"sha256": "zz", "bytes": 1}}}', "[", "7"]:
        (bad / CHECKSUMS_NAME).write_text(garbage)
        with pytest.raises(AtvSparseError, match=CHECKSUMS_NAME):
            verify_checkpoint(bad)
    shutil.copy(checkpoints["sharded"] / last.name, last)
    (bad / CHECKSUMS_NAME).unlink()
    with pytest.raises(AtvSparseError, match=f"no {CHECKSUMS_NAME}"):
        atv_sparse.load(bad, verify=True)
    assert verify_main([str(bad)]) == 2 and capsys.readouterr().err.startswith("error: ")
