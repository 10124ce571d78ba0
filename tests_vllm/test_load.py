"""vLLM's OpenAI server under concurrent requests (benchmarks/vllm_load.py): a packed checkpoint and
its dense export, N = 1, 8, 64 at once, mixed prompt lengths, greedy.

Every response arrives with its tokens, packed and dense give the same greedy tokens for every
request, neither server logs an error, and neither server's memory grows between the first and
the last round. Servers listen on 127.0.0.1 only; every wait is bounded and both are stopped.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from vllm_load import CONCURRENCY, run_load  # noqa: E402


def test_packed_and_dense_servers_agree_under_load(checkpoints, tmp_path):
    result = run_load(checkpoints["llama-2:4"], checkpoints["llama-2:4-dense"], tmp_path, rounds=2, budget_s=1500)
    assert result["problems"] == []
    assert max(CONCURRENCY) == 64 and result["identical_requests"] == 64
    assert len(result["batches"]) == 2 * len(CONCURRENCY) * 2  # rounds x N x servers, none missing
