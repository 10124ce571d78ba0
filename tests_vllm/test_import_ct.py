"""vLLM with the plugin on compressed-tensors checkpoints imported by ``python -m atv_sparse.import_ct``.

The sources are written by compressed-tensors 0.14.0.1 itself (tests/fixtures/compressed_tensors,
cases ``vllm_llama_24``: sparse-24-bitmask, and ``vllm_llama_unstructured``: sparse-bitmask
unstructured), from tiny Llamas pruned by atv_sparse whose dense versions are committed beside
them. Greedy tokens must equal transformers' on the dense model, and every imported linear must
run through the plugin.
"""

from pathlib import Path

import pytest
import torch

from conftest import MAX_TOKENS, run_vllm

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compressed_tensors"
CASES = {"vllm_llama_24": "vllm_llama", "vllm_llama_unstructured": "vllm_llama_unstructured"}
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 64], [11, 12, 13, 14, 15, 16, 17]]
SPARSE_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def hf_greedy(path: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in PROMPTS:
            seq = torch.tensor([ids])
            for _ in range(MAX_TOKENS):
                seq = torch.cat([seq, model(seq, use_cache=False).logits[0, -1].argmax().view(1, 1)], dim=1)
            out.append(seq[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def imported_runs(tmp_path_factory):
    from atv_sparse.import_ct import run

    root = tmp_path_factory.mktemp("import_ct")
    jobs = []
    for case in CASES:
        run([str(FIXTURES / "ct" / case), "--out", str(root / case)])
        jobs.append({"name": case, "model": str(root / case), "tp": 1, "eager": True, "prompts": PROMPTS,
                     "max_tokens": MAX_TOKENS})
    return run_vllm(root, jobs, tp=1)[0]


@pytest.mark.parametrize("case", CASES)
def test_imported_checkpoint_serves_like_the_dense_model(case, imported_runs):
    result = imported_runs[case]
    assert "error" not in result, result.get("traceback")
    assert result["tokens"] == hf_greedy(FIXTURES / "dense" / CASES[case])
    (layers,) = result["layers"]  # one rank
    sparse = {n for n, r in layers.items() if r["method"] == "AtvSparseLinearMethod"}
    assert sparse == {f"model.layers.{i}.{s}" for i in range(2) for s in SPARSE_LINEARS}
    for name in sparse:
        assert set(layers[name]["tensors"]) == {"weight_bitmask", "weight_values"}, layers[name]
