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
