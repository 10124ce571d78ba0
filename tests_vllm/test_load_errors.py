"""Checkpoints vLLM cannot serve are refused while the engine starts, with an error naming the layer.

Each bad checkpoint is a real ``atv_sparse.convert`` output (or one with an edited config);
the error must stop ``LLM(...)`` itself, before any request is served. A tensor-parallel
worker's error reaches the engine only as "initialization failed", so its message is looked for
in the job's own log as well.
"""

from conftest import job_log


def refused(run, name: str) -> str:
    results, log = run
    result = results[name]
    assert "error" in result, f"{name} loaded and served: {result.get('tokens')}"
    assert "tokens" not in result
    return result["error"] + "\n" + job_log(log, name)


def test_fused_group_pruned_in_part(tp1):
    text = refused(tp1, "bad-fused@tp1")
    assert ("layer model.layers.0.self_attn.qkv_proj: vLLM fuses q_proj + k_proj + v_proj into one linear, but the "
            "checkpoint prunes q_proj, v_proj and leaves k_proj dense") in text


def test_row_parallel_split_inside_a_group(tp2):
    text = refused(tp2, "bad-rowsplit@tp2")
    assert ("layer model.layers.0.mlp.down_proj: tensor parallel size 2 splits its 136 input columns into shards "
            "of 68, not a multiple of 8") in text


def test_unknown_format_version(tp1):
    text = refused(tp1, "bad-version@tp1")
    assert "atv_sparse checkpoint format version 99 is not supported" in text


def test_unknown_pattern(tp1):
    text = refused(tp1, "bad-pattern@tp1")
    assert "pattern '2:4:8' is not N:M" in text


def test_truncated_shard(tp1, checkpoints):
    """A shard cut short (a copy that stopped halfway) is refused by the plugin's header check while
    the engine starts, naming the file and the tensor, not later inside vLLM's weight loader."""
    text = refused(tp1, "bad-truncated@tp1")
    shard = checkpoints["bad-truncated"] / "model.safetensors"
    assert f"{shard}: tensor " in text and "the file is corrupt or truncated; copy or convert it again" in text


def test_block_without_pattern(tp1):
    text = refused(tp1, "bad-block@tp1")
    assert "config.json (atv_sparse vLLM plugin): quantization_config.pattern: expected 'N:M'" in text
    assert "it is missing; fix config.json or re-run atv_sparse.convert" in text


def test_config_that_is_not_json(tp1, checkpoints):
    """config.json cut short: transformers parses it before vLLM asks any plugin, so the error is
    transformers' own; it still stops the engine at start and names the file."""
    text = refused(tp1, "bad-json@tp1")
    assert f"{checkpoints['bad-json'] / 'config.json'}" in text and "not a valid JSON file" in text


# --- issue 18: the strict quantization_config schema and the header pre-flight, on vLLM's own path ----------
# vLLM builds the plugin's config from the block (from_config), then hands it the model directory
# (maybe_update_config): both must refuse, naming the file and the key, before the engine reads a weight.

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from atv_sparse.errors import AtvSparseError  # noqa: E402

GARBAGE = [("targets", "3:4", "quantization_config.targets"), ("targets", ["re:("], "not a valid regular expression"),
           ("sparsity", 1.5, "quantization_config.sparsity"), ("sparsity", "3:4", "quantization_config.sparsity"),
           ("ignore", None, "quantization_config.ignore")]


@pytest.mark.parametrize("key,value,words", GARBAGE, ids=[f"{k}={v}" for k, v, _ in GARBAGE])
def test_garbage_quantization_config_is_refused_by_the_plugin(checkpoints, tmp_path, key, value, words):
    from conftest import edit_config

    from atv_sparse.vllm_plugin.config import AtvSparseVllmConfig

    good = json.loads((checkpoints["llama-2:4"] / "config.json").read_text())["quantization_config"]
    bad = edit_config(checkpoints["llama-2:4"], tmp_path / "bad", **{key: value})
    block = json.loads((bad / "config.json").read_text())["quantization_config"]
    with pytest.raises(AtvSparseError, match=words.replace("(", r"\(")):
        AtvSparseVllmConfig.from_config(block)
    config = AtvSparseVllmConfig.from_config(good)  # a good block in memory, the bad file on disk
    with pytest.raises(AtvSparseError, match=f"{bad / 'config.json'}.*{words}".replace("(", r"\(")):
        config.maybe_update_config(str(bad))


def test_malformed_header_is_refused_by_the_plugin(checkpoints, tmp_path):
    from atv_sparse.vllm_plugin.config import AtvSparseVllmConfig

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["llama-2:4"], bad)
    shard = bad / "model.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["data_offsets"][1] = str(header["model.norm.weight"]["data_offsets"][1])
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    config = AtvSparseVllmConfig.from_config(json.loads((bad / "config.json").read_text())["quantization_config"])
    with pytest.raises(AtvSparseError, match="model.safetensors: tensor model.norm.weight: data_offsets"):
        config.maybe_update_config(str(bad))
