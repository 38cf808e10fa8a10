"""The one engine's worker against the worker of the commit before it (a git worktree of b9c2f01), same run.

    python bench/engine_serve.py [--baseline-commit b9c2f01] [--clients 16] [--rounds 2]

Both workers serve the demo model on the torch backend, fp32, behind one FastChat controller, under
different model names; each measurement runs old then new, or new then old (alternating per round), so
that whatever else the machine does hits both alike.

1. serving: `--clients` clients arriving together, each streaming one greedy answer of `--new-tokens`
   tokens (essay prompts that do not reach EOS): aggregate tokens/s, time to first token p50/p95;
2. head-of-line blocking: a stream is running; a ~4k-token prompt arrives; shortly after, a short
   request arrives. Reported: the short request's time to first token, the running stream's longest
   gap between chunks while the long prompt is prefilled, and the long request's own first token.
Writes bench/results/engine_serve.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_result  # noqa: E402
from bench.serve import TOPICS, chat_prompt, run_level  # noqa: E402
from bayling.serve.launch import HOST, ensure_started, free_port, start_process, stop_all  # noqa: E402

LONG_TEXT = ("Machine translation began in the 1950s with rule-based systems that encoded grammars and "
             "dictionaries by hand. Statistical methods replaced them in the 1990s, learning phrase tables from "
             "aligned corpora, and neural networks replaced those in the 2010s, first recurrent encoders and "
             "decoders with attention, then the Transformer. ")


def stream_timed(controller: str, model: str, prompt: str, new_tokens: int, t0: float) -> dict:
    """Stream one greedy answer; chunk arrival times relative to t0, first-token time, prompt tokens."""
    address = requests.post(controller + "/get_worker_address", json={"model": model}, timeout=10).json()["address"]
    payload = {"model": model, "prompt": prompt, "temperature": 0, "max_new_tokens": new_tokens, "echo": False}
    sent = time.perf_counter()
    arrivals, first, last, buffer = [], None, None, b""
    with requests.post(address + "/worker_generate_stream", json=payload, stream=True, timeout=3600) as r:
        for raw in r.iter_content(chunk_size=None):
            buffer += raw
            while b"\0" in buffer:
                piece, buffer = buffer.split(b"\0", 1)
                if not piece:
                    continue
                last = json.loads(piece)
                now = time.perf_counter()
                if last.get("text"):
                    arrivals.append(now - t0)
                    if first is None:
                        first = now
    if last is None or last.get("error_code"):
        raise RuntimeError(f"{model}: {last}")
    return {"sent_s": sent - t0, "ttft_s": (first - sent) if first else None, "arrivals": arrivals,
            "prompt_tokens": last["usage"]["prompt_tokens"], "completion_tokens": last["usage"]["completion_tokens"]}


def head_of_line(controller: str, model: str, long_words: int) -> dict:
    """A running stream, then a ~4k-token prompt, then 0.5 s later a short request."""
    t0 = time.perf_counter()
    out: dict = {}
    long_prompt = chat_prompt("the following notes, in your own words: " + " ".join([LONG_TEXT] * long_words))
    runner = threading.Thread(target=lambda: out.__setitem__(
        "running", stream_timed(controller, model, chat_prompt(TOPICS[0]), 400, t0)))
    runner.start()
    time.sleep(4.0)  # the running stream is decoding by now
    long_req = threading.Thread(target=lambda: out.__setitem__(
        "long", stream_timed(controller, model, long_prompt, 4, t0)))
    long_req.start()
    time.sleep(0.5)  # the long prompt's prefill has begun
    out["short"] = stream_timed(controller, model, chat_prompt(TOPICS[1]), 8, t0)
    long_req.join()
    runner.join()
    long_start = out["long"]["sent_s"]
    long_end = long_start + out["long"]["ttft_s"]
    during = [t for t in out["running"]["arrivals"] if long_start <= t <= long_end]
    window = [long_start] + during + [long_end]
    return {"long_prompt_tokens": out["long"]["prompt_tokens"],
            "long_ttft_s": round(out["long"]["ttft_s"], 2),
            "short_ttft_s": round(out["short"]["ttft_s"], 2),
            "running_chunks_during_long_prefill": len(during),
            "running_longest_gap_during_long_prefill_s": round(max(b - a for a, b in zip(window, window[1:])), 2)}


def start_stack(baseline: Path, env: dict, work: Path) -> tuple[list, str, dict]:
    services = []
    port = free_port()
    ctl = start_process("controller", ["-m", "fastchat.serve.controller", "--host", HOST, "--port", str(port)],
                        work, f"http://{HOST}:{port}", env=env, stop_grace=1.0)
    services.append(ctl)
    ensure_started(ctl, "/test_connection", 60)
    workers = {}
    for name, path, extra in (("old", baseline, []), ("new", ROOT, ["--backend", "torch"])):
        p = free_port()
        w = start_process(f"worker-{name}", ["-m", "bayling.serve.worker", "--host", HOST, "--port", str(p),
                                             "--controller-address", ctl.url, "--model-names", name,
                                             "--limit-worker-concurrency", "16", "--device", "cpu", *extra],
                          work, f"http://{HOST}:{p}", env={**env, "PYTHONPATH": str(path)}, cwd=path)
        services.append(w)
        ensure_started(w, "/worker_get_status", 900, "POST")
        workers[name] = w
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        models = requests.post(ctl.url + "/list_models", timeout=5).json()["models"]
        if {"old", "new"} <= set(models):
            break
        time.sleep(0.5)
    return services, ctl.url, workers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-commit", default="b9c2f01")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long-repeats", type=int, default=52, help="repeats of a ~75-token paragraph (~4k tokens)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both workers")
    ap.add_argument("--skip-hol", action="store_true")
    ns = ap.parse_args()
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(ns.threads)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-serve-"))
    base = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), ns.baseline_commit], cwd=ROOT, check=True,
                   capture_output=True)
    services = []
    result: dict = {"serving": {"old": [], "new": []}, "head_of_line": {"old": [], "new": []}}
    try:
        services, controller, _ = start_stack(base, env, tmp / "logs")
        for name in ("old", "new"):  # warm-up: first requests pay for lazy initialisation
            run_level(controller, name, 2, 8, 1, stock=False)
        for r in range(ns.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for name in order:
                level = run_level(controller, name, ns.clients, ns.new_tokens, 1, stock=False)
                print(name, level, flush=True)
                result["serving"][name].append(level)
            if not ns.skip_hol:
                for name in order:
                    hol = head_of_line(controller, name, ns.long_repeats)
                    print(name, hol, flush=True)
                    result["head_of_line"][name].append(hol)
    finally:
        stop_all(reversed(services))
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)

    def mean(name: str, section: str, key: str) -> float:
        values = [x[key] for x in result[section][name]]
        return sum(values) / len(values) if values else float("nan")

    summary = {
        "tokens_per_s_ratio_new_over_old": round(mean("new", "serving", "tokens_per_s")
                                                 / mean("old", "serving", "tokens_per_s"), 3),
        "ttft_p50_ratio_new_over_old": round(mean("new", "serving", "ttft_p50_s")
                                             / mean("old", "serving", "ttft_p50_s"), 3),
        "ttft_p95_ratio_new_over_old": round(mean("new", "serving", "ttft_p95_s")
                                             / mean("old", "serving", "ttft_p95_s"), 3),
    }
    if not ns.skip_hol:
        summary["short_ttft_speedup_old_over_new"] = round(mean("old", "head_of_line", "short_ttft_s")
                                                           / mean("new", "head_of_line", "short_ttft_s"), 2)
    result["summary"] = summary
    result["targets"] = {"tokens_per_s_ratio_new_over_old": ">= 1.0", "ttft_p50_ratio_new_over_old": "<= 0.8",
                         "short_ttft_speedup_old_over_new": ">= 3"}
    result["setup"] = {"baseline_commit": ns.baseline_commit, "clients": ns.clients, "new_tokens": ns.new_tokens,
                       "rounds": ns.rounds, "omp_threads": ns.threads, "model": "demo (SmolLM2-135M-Instruct, "
                       "Q4_1 GGUF de-quantized to fp32, torch backend)",
                       "client": "controller /get_worker_address, then the worker's /worker_generate_stream"}
    write_result("engine_serve", {"machine": machine(), **result})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
