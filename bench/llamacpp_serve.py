"""Serving the demo GGUF at 1, 8 and 16 clients: our worker on llama.cpp vs our worker on torch vs llama-server.

    bash bench/build_llama_server.sh            # once: llama-server from llama-cpp-python's own llama.cpp source
    .venv/bin/python bench/llamacpp_serve.py [--llama-server PATH] [--clients 1 8 16] [--rounds 2]

All three serve the same file (the demo model's Q4_1 GGUF; torch de-quantizes it to fp32) with 2
threads, at the same time, each idle while another is measured. Our workers sit behind FastChat's
controller and are driven as FastChat's clients do (controller /get_worker_address, then
/worker_generate_stream); llama-server (`-np 16`, continuous batching) gets the same prompts on its
native streaming /completion route; a second llama-server runs with `-fa off` (flash attention
off, as our worker and llama_cpp.Llama have it by default). Every request is greedy with ignore_eos, so all generate exactly
`--new-tokens` tokens. Each level runs the servers in a rotating order per round. Aggregate tokens/s =
all tokens generated at that level / wall time. Writes bench/results/llamacpp_serve.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_result  # noqa: E402
from bench.serve import TOPICS, chat_prompt, one_request, run_clients  # noqa: E402
from bayling.demo import demo_gguf_path  # noqa: E402
from bayling.serve.launch import HOST, Service, ensure_started, free_port, start_process, stop_all  # noqa: E402

DEFAULT_SERVER = ROOT / ".llama-server" / "bin" / "llama-server"
THREADS = 2
SLOTS = 16


def server_request(url: str, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    payload = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
               "cache_prompt": False}
    first, tokens = None, None
    with requests.post(url + "/completion", json=payload, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if first is None and event.get("content"):
                first = time.perf_counter()
            if event.get("stop"):
                tokens = event.get("tokens_predicted") or event.get("timings", {}).get("predicted_n")
    end = time.perf_counter()
    if tokens is None:
        raise RuntimeError(f"llama-server: no final event from {url}")
    return {"tokens": tokens, "ttft_s": (first or end) - start, "latency_s": end - start}


def start_all(server: Path, gguf: Path, work: Path, worker_args: list[str]) -> tuple[list[Service], dict]:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)}
    services: list[Service] = []
    port = free_port()
    ctl = start_process("controller", ["-m", "fastchat.serve.controller", "--host", HOST, "--port", str(port)],
                        work, f"http://{HOST}:{port}", env=env, stop_grace=1.0)
    services.append(ctl)
    ensure_started(ctl, "/test_connection", 60)
    for backend, extra in (("llama.cpp", worker_args), ("torch", ["--device", "cpu"])):
        p = free_port()
        w = start_process(f"worker-{backend}", ["-m", "bayling.serve.worker", "--host", HOST, "--port", str(p),
                                                "--controller-address", ctl.url, "--model-names", backend,
                                                "--backend", backend, "--limit-worker-concurrency", str(SLOTS),
                                                "--max-num-seqs", str(SLOTS), *extra],
                          work, f"http://{HOST}:{p}", env=env)
        services.append(w)
        ensure_started(w, "/worker_get_status", 900, "POST")
    servers = {}
    for name, extra in (("llama-server", []), ("llama-server_fa_off", ["-fa", "off"])):
        p = free_port()
        # llama-server is not Python: start it by hand, in its own session like the others.
        log_path = work / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([str(server), "-m", str(gguf), "--host", HOST, "--port", str(p),
                                     "-np", str(SLOTS), "-t", str(THREADS), "-tb", str(THREADS), "-c", "8192",
                                     "--no-webui", *extra],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        srv = Service(name, proc, f"http://{HOST}:{p}", log_path)
        services.append(srv)
        ensure_started(srv, "/health", 120)
        servers[name] = srv.url
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if {"llama.cpp", "torch"} <= set(requests.post(ctl.url + "/list_models", timeout=5).json()["models"]):
            break
        time.sleep(0.5)
    return services, {"ctl": ctl.url, **servers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", type=Path, default=DEFAULT_SERVER)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker-args", default="", help="extra flags for our llama.cpp worker")
    ap.add_argument("--torch-rounds", type=int, default=1, help="the torch worker is slow: fewer rounds")
    ns = ap.parse_args()
    if not ns.llama_server.exists():
        print(f"error: no llama-server at {ns.llama_server}; run bash bench/build_llama_server.sh", file=sys.stderr)
        return 2
    gguf = demo_gguf_path()
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-serve-"))
    services, urls = start_all(ns.llama_server, gguf, work, ns.worker_args.split())

    def ours(model: str):
        return lambda i: one_request(urls["ctl"], model, chat_prompt(TOPICS[i % len(TOPICS)]), ns.new_tokens,
                                     stock=False, ignore_eos=True)

    senders = {"ours_llama.cpp": ours("llama.cpp"), "ours_torch": ours("torch"),
               **{name: (lambda i, url=urls[name]: server_request(url, chat_prompt(TOPICS[i % len(TOPICS)]),
                                                                  ns.new_tokens))
                  for name in ("llama-server", "llama-server_fa_off")}}
    levels: dict = {name: {} for name in senders}
    try:
        for name, send in senders.items():  # warm-up
            run_clients(send, 2)
        for clients in ns.clients:
            for r in range(ns.rounds):
                names = list(senders)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    if name == "ours_torch" and r >= ns.torch_rounds:
                        continue
                    level = run_clients(senders[name], clients)
                    print(name, level, flush=True)
                    levels[name].setdefault(str(clients), []).append(level)
    finally:
        stop_all(reversed(services))

    def best(name: str, clients: int) -> float:
        return max(x["tokens_per_s"] for x in levels[name][str(clients)])

    summary = {str(c): {"ours_llama.cpp_tok_s": best("ours_llama.cpp", c), "llama-server_tok_s": best("llama-server", c),
                        "llama-server_fa_off_tok_s": best("llama-server_fa_off", c),
                        "ours_torch_tok_s": best("ours_torch", c),
                        "ratio_ours_llama.cpp_over_llama-server_fa_off": round(best("ours_llama.cpp", c)
                                                                               / best("llama-server_fa_off", c), 3),
                        "ratio_ours_llama.cpp_over_llama-server": round(best("ours_llama.cpp", c)
                                                                        / best("llama-server", c), 3),
                        "ratio_ours_llama.cpp_over_ours_torch": round(best("ours_llama.cpp", c)
                                                                      / best("ours_torch", c), 2)}
               for c in ns.clients}
    version = subprocess.run([str(ns.llama_server), "--version"], capture_output=True, text=True)
    write_result("llamacpp_serve", {
        "machine": machine(), "summary": summary, "levels": levels,
        "target": "ours_llama.cpp >= 0.9x llama-server at every concurrency",
        "setup": {"model": str(gguf.name), "threads": THREADS, "new_tokens": ns.new_tokens, "rounds": ns.rounds,
                  "greedy": True, "ignore_eos": True, "figure": "best round per level",
                  "llama_server": f"-np {SLOTS} -t {THREADS} -tb {THREADS} -c 8192 (flash attention auto = on for "
                                  f"this CPU; llama-server_fa_off adds -fa off); "
                                  + " ".join((version.stdout + version.stderr).split())[:120],
                  "worker_args": ns.worker_args}})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
