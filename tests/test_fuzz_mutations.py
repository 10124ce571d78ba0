"""Deterministic mutation tests: the fuzz targets on seeded mutations, and whole checkpoints damaged the
way the issue's 150-mutation experiment damaged them, loaded with atv_sparse.load.

Each input either loads or is refused with AtvSparseError; any other exception fails. The
coverage-guided fuzzing of the same targets is .ci/fuzz.sh (atheris).
"""

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from script_modules import load_script

import atv_sparse
from atv_sparse.convert import main
from atv_sparse.errors import AtvSparseError

targets = load_script("fuzz/targets.py")  # before mutate.py, which imports it by name
mutate = load_script("fuzz/mutate.py")


@pytest.mark.parametrize("target", targets.TARGETS)
def test_seeds_are_accepted(target):
    """Mutations start from valid files; a seed the code refuses would test nothing."""
    for name, data in targets.seeds(target):
        assert targets.run(target, data), name


@pytest.mark.parametrize("target", targets.TARGETS)
def test_mutated_inputs_load_or_are_refused_by_name(target):
    counts = mutate.run(target, 400, seed=0, quiet=True)
    # the mutations must reach both outcomes, or they test only the first check
    assert counts["refused"] > 50 and counts["loaded"] > 0


def test_mutations_are_deterministic():
    rng_a, rng_b = random.Random(3), random.Random(3)
    data = targets.seeds("header")[0][1]
    assert [mutate.mutate("header", data, rng_a) for _ in range(20)] == \
           [mutate.mutate("header", data, rng_b) for _ in range(20)]


# --- whole checkpoints --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("mut") / "packed"
    assert main([str(tiny_llama), "--out", str(out), "--method", "magnitude", "--quiet"]) == 0
    return out


def damage(ckpt: Path, rng: random.Random) -> str:
    """One damage of the issue's kinds; returns its kind."""
    shard = ckpt / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    kind = rng.choice(["header bytes", "header field", "data bytes", "truncation", "config field"])
    if kind == "header bytes":
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(8, 8 + n)] = rng.randrange(256)
    elif kind == "header field":
        raw = bytearray(mutate.mutate("header", bytes(raw), rng))
    elif kind == "data bytes":
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(8 + n, len(raw))] ^= 1 << rng.randrange(8)
    elif kind == "truncation":
        del raw[rng.randrange(len(raw)):]
    if kind != "config field":
        shard.write_bytes(raw)
        return kind
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = mutate.mutate_json(config["quantization_config"], rng)
    (ckpt / "config.json").write_text(json.dumps(config))
    return kind


def test_damaged_checkpoints_load_or_are_refused(packed, tmp_path):
    rng = random.Random(18)
    outcomes = {}
    reference = atv_sparse.load(packed, progress=False).state_dict()
    for i in range(30):
        ckpt = tmp_path / f"c{i}"
        shutil.copytree(packed, ckpt)
        kind = damage(ckpt, rng)
        try:
            model = atv_sparse.load(ckpt, progress=False)
        except AtvSparseError:
            outcome = "refused"
        else:
            # a damage that loads is a value changed inside the data or a harmless config edit: verify must
            # catch every changed byte, and nothing else may differ from the undamaged checkpoint
            if kind in ("data bytes", "header bytes", "header field", "truncation"):
                with pytest.raises(AtvSparseError, match="SHA-256 .* differs"):
                    atv_sparse.load(ckpt, verify=True, progress=False)
            state = model.state_dict()
            assert state.keys() == reference.keys()
            assert all(state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in reference.items())
            outcome = "loaded"
        outcomes.setdefault(kind, []).append(outcome)
        shutil.rmtree(ckpt)
    assert len(outcomes) == 5 and "refused" in sum(outcomes.values(), [])
