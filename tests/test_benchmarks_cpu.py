"""The benchmark scripts on a CPU: latency.py exits 0 with a message, and the end-to-end decoder it
times (benchmarks/llama_decode.py) computes what transformers' Llama computes, dense and sparse."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from script_modules import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
llama_decode = load_script("benchmarks/llama_decode.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_latency_without_gpu_says_so_and_exits_zero():
    run = subprocess.run([sys.executable, str(BENCH / "latency.py"), "--e2e"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "no CUDA GPU" in run.stdout


def tiny_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_decoder_matches_transformers_prefill_and_cached_decode():
    hf = tiny_hf_llama()
    mine = llama_decode.from_hf(hf).eval()
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        got = mine(ids, torch.arange(9))
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
        tokens, _ = llama_decode.generate(mine, ids, 6, cuda_graph=False)
        ref_tokens = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, 9:]
    assert torch.equal(tokens[0], ref_tokens)


def test_sparsified_decoder_uses_sparse_linears_with_the_same_function():
    from atv_sparse.nn.sparse_linear import SparseLinear

    mine = llama_decode.from_hf(tiny_hf_llama()).eval()
    ids = torch.randint(0, 96, (1, 7))
    pruned = {}
    for i, block in enumerate(mine.layers):  # the expected result: dense linears with magnitude 2:4 zeros
        for attr in ("wqkv", "wo", "w_gate_up", "w_down"):
            w = getattr(block, attr).weight.data
            groups = w.abs().reshape(w.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
            pruned[(i, attr)] = w * keep.reshape(w.shape)
    with torch.no_grad():
        for (i, attr), w in pruned.items():
            getattr(mine.layers[i], attr).weight.copy_(w)
        expected = mine(ids, torch.arange(7))
        llama_decode.sparsify(mine, "2:4")
        got = mine(ids, torch.arange(7))
    assert all(isinstance(getattr(b, a), SparseLinear) for b in mine.layers for a in ("wqkv", "w_down"))
    assert mine.layers[0].w_gate_up.gated
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_checkpoint_e2e_report_counts_the_tokens_before_the_first_difference():
    e2e = load_script("benchmarks/cpu_checkpoints_e2e.py")
    run = {"dense": {"tokens_per_s_median": 10.0, "unpreempted": 0, "calls": 2},
           "packed": {"tokens_per_s_median": 14.0, "unpreempted": 1, "calls": 2},
           "model": "m", "pruned_linears": 3, "largest": "8x4", "speedup_median": 1.4, "speedup_best": 1.5,
           "linear_bytes_ratio": 0.5625, "plans": ["cpu"], "tokens_equal": False,
           "tokens": {"dense": [5, 6, 7, 8], "packed": [5, 6, 9, 8]}}
    assert e2e.agreement(run) == "no: the first 2 of 4 equal"
    assert e2e.agreement({**run, "tokens_equal": True}) == "yes"
    env = {"date": "d", "cpu": "c", "cores": 2, "torch": "t", "transformers": "x", "python": "p",
           "load_avg_start": 1.0, "load_avg_end": 2.0}
    text = e2e.markdown({"env": env, "command": "cmd", "args": {"new_tokens": 4, "rounds": 2}, "models": [run]})
    assert "| m | 3 (8x4) | 10.0 | 14.0 | 1.40x | 1.50x | 0/2 / 1/2 | 0.562 | no: the first 2 of 4 equal | cpu |" in text


def test_vllm_throughput_report_compares_every_run_with_the_dense_export():
    tput = load_script("benchmarks/vllm_cpu_throughput.py")
    runs = [{"kind": k, "tokens_per_s": v, "tokens": t, "methods": ["M"], "init_s": 1.0, "vllm": "0", "backends": b,
             "torch": "t", "transformers": "x"}
            for k, v, t, b in (("dense", 10.0, [[1, 2, 3, 4]], []), ("packed", 15.0, [[1, 2, 9, 4]], ["cpu"]),
                               ("dense", 12.0, [[1, 2, 3, 4]], []), ("packed", 13.0, [[1, 2, 3, 4]], ["cpu"]))]
    env = {"date": "d", "cpu": "c", "cores": 2, "python": "p", "load_avg_start": 1.0, "load_avg_end": 1.0}
    text = tput.markdown({"env": env, "command": "cmd", "runs": runs,
                          "args": {"layers": 2, "rounds": 2, "batch": 1, "new_tokens": 4}})
    assert "| tokens/s, median over rounds | 11.00 | 14.00 | 1.27x |" in text
    assert "no: 100%, 50%, 100%, 100% of tokens before the first difference" in text
