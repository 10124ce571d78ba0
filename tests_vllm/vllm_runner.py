"""Run a list of vLLM jobs in one process and write what each produced as JSON.

    python tests_vllm/vllm_runner.py JOBS.json RESULTS.json

JOBS.json: a list of {"name", "model", "tp", "prompts": [[token ids]], "max_tokens", "eager"}.
For each job: ``LLM(model)``, greedy generation of every prompt at once (``ignore_eos``, one
logprob per token), and a report of every linear layer on every rank (its quant method and
the parameters it holds), or the error that stopped it. One process serves all jobs of a tensor
parallel size because importing vLLM costs far more than building a tiny model (in-process
engine: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Jobs expected to fail go last.

stderr carries ``=== job NAME start ===`` / ``=== job NAME end ===`` lines, so a test can read
a job's own log, worker processes included (a tensor-parallel worker's error reaches the
engine only as "initialization failed"; its message is in the log).
"""

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more than a tiny model needs
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def linear_report(model) -> dict:
    """Every linear of one rank's model: quant method, parameters and buffers (shape, dtype)."""
    from vllm.model_executor.layers.linear import LinearBase

    report = {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        tensors = dict(module.named_parameters(recurse=False))
        tensors.update(dict(module.named_buffers(recurse=False)))
        report[name] = {
            "method": type(module.quant_method).__name__,
            "tensors": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()},
            "has_weight_attr": getattr(module, "weight", None) is not None,
            "input_size_per_partition": getattr(module, "input_size_per_partition", None),
            "output_size_per_partition": getattr(module, "output_size_per_partition", None),
        }
    return report


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], tensor_parallel_size=job["tp"], dtype="float32", enforce_eager=job.get("eager", True),
              max_model_len=128, max_num_seqs=8, seed=0, disable_log_stats=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
        tokens, logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens.append(list(completion.token_ids))
            steps = zip(completion.token_ids, completion.logprobs, strict=True)
            logprobs.append([step[t].logprob for t, step in steps])
        layers = llm.apply_model(linear_report)
    finally:
        del llm
        gc.collect()
    return {"tokens": tokens, "logprobs": logprobs, "layers": layers, "seconds": time.perf_counter() - t0}


def main(jobs_path: str, results_path: str) -> None:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from atv_sparse.vllm_plugin import register

    jobs = json.loads(open(jobs_path).read())
    results = {}
    for job in jobs:
        print(f"=== job {job['name']} start ===", file=sys.stderr, flush=True)
        try:
            results[job["name"]] = run_job(job)
        except Exception as e:  # a job expected to fail; the test decides
            results[job["name"]] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"=== job {job['name']} end ===", file=sys.stderr, flush=True)
        with open(results_path, "w") as f:  # after every job, so a crash keeps what finished
            json.dump(results, f)
    register()  # vLLM already ran it through the entry point; again must change nothing
    results["_meta"] = {"quantization_methods_atv_sparse": QUANTIZATION_METHODS.count("atv_sparse")}
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM's CPU workers are spawned: they re-import this file
    main(sys.argv[1], sys.argv[2])
