"""Serving throughput: FastChat's stock model_worker vs ours, both behind FastChat's controller; then a soak.

Run: .venv/bin/python bench/serve.py      (about 10-15 minutes on 2 CPU cores; writes bench/results/serve.json)
     .venv/bin/python bench/serve.py --soak   (the soak under faults alone, bench/serve_soak.py: about 5 minutes;
                                              rewrites only the `soak` section of bench/results/serve.json)

Both workers serve the same model (the demo model's plain HF folder) at the same time under different
names, and each concurrency level runs stock then ours (alternating the order per level) so that the
background load of a shared machine hits both alike. A client asks the controller for a worker
address, then streams /worker_generate_stream from it, as FastChat's clients do. Greedy, 128 new
tokens, a different essay prompt per client (all run to 128 tokens without reaching EOS).

The stock worker runs unchanged except for one patch applied before it starts: fastchat.utils.
get_context_length raises KeyError('factor') under transformers 5 (which fills rope_scaling without
a factor); editing config.json does not help there because transformers refills it, so the bench
replaces that helper with config.max_position_embeddings (see STOCK_SHIM).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.common import RESULTS, command_line, machine, write_result  # noqa: E402
from bayling.serve.launch import HOST, ensure_started, free_port, start_process, stop_all  # noqa: E402

TOPICS = ["the history of machine translation", "how bees make honey", "the French revolution",
          "volcanoes and plate tectonics", "the invention of the printing press", "how vaccines work",
          "the life of Marie Curie", "ocean currents and climate", "the silk road", "how computers store numbers",
          "the water cycle", "ancient Roman roads", "the physics of flight", "how tea is grown and made",
          "the history of the bicycle", "photosynthesis in plants"]
STOCK_SHIM = '''import runpy, sys
import fastchat.utils
# fschat 0.2.36 + transformers 5: get_context_length() reads rope_scaling["factor"], which is absent.
fastchat.utils.get_context_length = lambda config: int(getattr(config, "max_position_embeddings", 2048))
sys.argv[0] = "fastchat.serve.model_worker"
runpy.run_module("fastchat.serve.model_worker", run_name="__main__", alter_sys=True)
'''
TARGETS = {"throughput_ratio_at_8_clients": 4.0, "throughput_ratio_at_1_client": 0.95}


def chat_prompt(topic: str) -> str:
    # The demo model's ChatML (its tokenizer's chat_template with its default system prompt).
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\nWrite a long, detailed essay about {topic}.<|im_end|>\n<|im_start|>assistant\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def one_request(controller: str, model: str, prompt: str, new_tokens: int, stock: bool,
                ignore_eos: bool = False) -> dict:
    """Ask the controller for a worker, stream one answer; return timings and token count."""
    start = time.perf_counter()
    address = requests.post(controller + "/get_worker_address", json={"model": model}, timeout=10).json()["address"]
    payload = {"model": model, "prompt": prompt, "temperature": 0, "max_new_tokens": new_tokens, "echo": False,
               "stop_token_ids": None, "stop": None}
    if ignore_eos:
        payload["ignore_eos"] = True
    first, last, buffer = None, None, b""
    with requests.post(address + "/worker_generate_stream", json=payload, stream=True, timeout=3600) as r:
        for raw in r.iter_content(chunk_size=None):
            buffer += raw
            while b"\0" in buffer:
                piece, buffer = buffer.split(b"\0", 1)
                if piece:
                    last = json.loads(piece)
                    if first is None and last.get("text"):
                        first = time.perf_counter()
    end = time.perf_counter()
    if last is None or last.get("error_code"):
        raise RuntimeError(f"{model}: {last}")
    # FastChat's generate_stream reports completion_tokens = its loop index, one less than it generated.
    tokens = last["usage"]["completion_tokens"] + (1 if stock else 0)
    return {"tokens": tokens, "ttft_s": (first or end) - start, "latency_s": end - start,
            "finish_reason": last["finish_reason"]}


def run_level(controller: str, model: str, clients: int, new_tokens: int, rounds: int, stock: bool) -> dict:
    """`clients` threads, each sending `rounds` requests back to back."""
    return run_clients(lambda i: one_request(controller, model, chat_prompt(TOPICS[i % len(TOPICS)]), new_tokens,
                                             stock), clients, rounds)


def run_clients(send, clients: int, rounds: int = 1) -> dict:
    """`clients` threads, each calling send(i) `rounds` times back to back (i counts the client's requests)."""
    results, errors = [], []

    def client(i: int) -> None:
        for r in range(rounds):
            try:
                results.append(send(i + r))
            except Exception as e:  # counted, reported
                errors.append(str(e)[:200])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    lat, ttft = [r["latency_s"] for r in results], [r["ttft_s"] for r in results]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "generated_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
            "latency_p50_s": round(percentile(lat, 0.5), 2) if lat else None,
            "latency_p95_s": round(percentile(lat, 0.95), 2) if lat else None,
            "ttft_p50_s": round(percentile(ttft, 0.5), 3) if ttft else None,
            "ttft_p95_s": round(percentile(ttft, 0.95), 3) if ttft else None,
            "min_tokens_per_request": min((r["tokens"] for r in results), default=0)}


def worker_stats(url: str) -> dict:
    return requests.post(url + "/worker_get_status", timeout=10).json().get("batching", {})


def soak(controller_url: str, worker_pid: int, api_urls: dict, n: int, concurrency: int, new_tokens: int) -> dict:
    """n chat completions at `concurrency`, alternating FastChat's server (plain) and ours (streamed)."""
    import psutil

    proc = psutil.Process(worker_pid)
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": [], "incomplete": 0, "rss": {}, "by_server": {}}

    def check_plain(url: str, body: dict) -> bool:
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
        d = r.json()
        c = d["choices"][0]
        return (r.status_code == 200 and bool(c["message"]["content"]) and c["finish_reason"] in ("stop", "length")
                and d["usage"]["completion_tokens"] > 0)

    def check_stream(url: str, body: dict) -> bool:
        with requests.post(url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=600) as r:
            lines = [ln[6:] for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
        events = [json.loads(x) for x in lines[:-1]] if lines and lines[-1] == "[DONE]" else []
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
        return bool(events) and bool(text) and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    def client() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= n:
                    return
                state["next"] += 1
            name = "fastchat" if i % 2 == 0 else "bayling"
            body = {"model": "ours", "temperature": 0.7, "max_tokens": new_tokens,
                    "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]}
            try:
                ok = (check_plain if name == "fastchat" else check_stream)(api_urls[name], body)
            except Exception as e:
                ok = None
                with lock:
                    state["errors"].append(f"{name}: {str(e)[:200]}")
            with lock:
                state["done"] += 1
                state["by_server"][name] = state["by_server"].get(name, 0) + 1
                if ok is False:
                    state["incomplete"] += 1
                if state["done"] in (50, n):
                    state["rss"][state["done"]] = proc.memory_info().rss

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss50, rss_end = state["rss"].get(50), state["rss"].get(n)
    growth = (rss_end - rss50) / rss50 if rss50 and rss_end else None
    return {"requests": n, "concurrency": concurrency, "max_tokens": new_tokens,
            "wall_s": round(time.perf_counter() - start, 1), "requests_by_server": state["by_server"],
            "errors": len(state["errors"]), "error_samples": state["errors"][:3],
            "incomplete_responses": state["incomplete"],
            "worker_rss_mib_at_50": round(rss50 / 2**20, 1) if rss50 else None,
            "worker_rss_mib_at_end": round(rss_end / 2**20, 1) if rss_end else None,
            "worker_rss_growth_50_to_end": round(growth, 4) if growth is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="requests per client per level")
    parser.add_argument("--limit-worker-concurrency", type=int, default=16, help="for both workers")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for both workers (0: torch default). 1 by default: on a shared "
                             "2-core machine two OpenMP threads per process run several times slower as soon "
                             "as anything else runs")
    parser.add_argument("--omp-wait-policy", default="default", choices=("PASSIVE", "ACTIVE", "default"),
                        help="OMP_WAIT_POLICY for both workers; PASSIVE keeps idle OpenMP threads from spinning, "
                             "which on a busy shared machine is several times faster")
    parser.add_argument("--soak-requests", type=int, default=300)
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--soak-tokens", type=int, default=32)
    parser.add_argument("--out", default="serve", help="result name under bench/results/")
    parser.add_argument("--soak", action="store_true",
                        help="run only the soak under faults (early disconnects, malformed requests, a worker "
                             "SIGKILL and restart) through the launcher, and rewrite the `soak` section")
    parser.add_argument("--soak-kill-at", type=int, default=120, help="SIGKILL the worker after this many answers")
    parser.add_argument("--soak-timeout", type=float, default=120.0, help="per request: longer is a hang")
    args = parser.parse_args()
    if args.soak:
        return soak_under_faults(args)

    import os

    from bayling.demo import converted_gguf_folder, demo_gguf_path

    model_dir = converted_gguf_folder(demo_gguf_path())
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    (work / "stock_worker.py").write_text(STOCK_SHIM)
    env = {"HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    load_before = os.getloadavg()
    services = []
    try:
        port = free_port()
        ctl = start_process("controller", ["-m", "fastchat.serve.controller", "--host", HOST, "--port", str(port)],
                            work, f"http://{HOST}:{port}", stop_grace=1.0)
        services.append(ctl)
        ensure_started(ctl, "/test_connection", 60)
        workers = {}
        for name, script in (("stock", str(work / "stock_worker.py")), ("ours", str(ROOT / "model_worker.py"))):
            p = free_port()
            w = start_process(f"worker-{name}", [script, "--model-path", str(model_dir), "--device", "cpu",
                                                 "--host", HOST, "--port", str(p), "--worker-address",
                                                 f"http://{HOST}:{p}", "--controller-address", ctl.url,
                                                 "--model-names", name, "--limit-worker-concurrency",
                                                 str(args.limit_worker_concurrency)], work, f"http://{HOST}:{p}",
                              env=env)
            services.append(w)
            ensure_started(w, "/worker_get_status", 600, "POST")
            workers[name] = w
        while sorted(requests.post(ctl.url + "/list_models", timeout=10).json()["models"]) != ["ours", "stock"]:
            time.sleep(0.5)
        for name in workers:  # warm up: first calls allocate and load lazily
            one_request(ctl.url, name, chat_prompt(TOPICS[0]), 8, name == "stock")

        levels = []
        for i, clients in enumerate(args.clients):
            order = ("stock", "ours") if i % 2 == 0 else ("ours", "stock")
            level = {}
            for name in order:
                before = worker_stats(workers[name].url) if name == "ours" else {}
                print(f"{name}: {clients} client(s)...", flush=True)
                level[name] = run_level(ctl.url, name, clients, args.new_tokens, args.rounds, name == "stock")
                if name == "ours":
                    after = worker_stats(workers[name].url)
                    steps = after["decode_steps"] - before["decode_steps"]
                    level[name]["mean_decode_batch"] = round(
                        (after["decode_rows"] - before["decode_rows"]) / steps, 2) if steps else 0.0
                print(f"  {level[name]['tokens_per_s']} tok/s, p50 {level[name]['latency_p50_s']} s, "
                      f"ttft p50 {level[name]['ttft_p50_s']} s", flush=True)
            stock_rate = level["stock"]["tokens_per_s"]
            ratio = level["ours"]["tokens_per_s"] / stock_rate if stock_rate else None
            levels.append({"clients": clients, "stock": level["stock"], "ours": level["ours"],
                           "throughput_ratio": round(ratio, 2) if ratio else None})

        stop_all([workers.pop("stock")])  # the soak is ours alone
        api_urls = {}
        servers = (("fastchat", "fastchat.serve.openai_api_server"), ("bayling", "bayling.serve.openai_api"))
        for name, module in servers if args.soak_requests else ():
            p = free_port()
            api = start_process(f"openai-{name}", ["-m", module, "--host", HOST, "--port", str(p),
                                                   "--controller-address", ctl.url], work, f"http://{HOST}:{p}",
                                env=env)
            services.append(api)
            ensure_started(api, "/v1/models", 60)
            api_urls[name] = api.url
        print(f"soak: {args.soak_requests} requests at concurrency {args.soak_concurrency}...", flush=True)
        soak_result = {"requests": 0, "errors": 0, "incomplete_responses": 0, "worker_rss_growth_50_to_end": None}
        if args.soak_requests:
            soak_result = soak(ctl.url, workers["ours"].proc.pid, api_urls, args.soak_requests,
                               args.soak_concurrency, args.soak_tokens)
        print(f"  {soak_result}", flush=True)
    finally:
        stop_all(reversed(services))

    by_clients = {lv["clients"]: lv for lv in levels}
    r8 = by_clients.get(8, {}).get("throughput_ratio")
    r1 = by_clients.get(1, {}).get("throughput_ratio")
    growth = soak_result["worker_rss_growth_50_to_end"]
    targets = {
        "ours_vs_stock_at_8_clients": {"target": ">= 4.0x", "measured": r8, "met": r8 is not None and r8 >= 4.0},
        "ours_vs_stock_at_1_client": {"target": ">= 0.95x", "measured": r1, "met": r1 is not None and r1 >= 0.95},
        "soak_plain_errors": {"target": 0, "measured": soak_result["errors"], "met": soak_result["errors"] == 0},
        "soak_plain_incomplete": {"target": 0, "measured": soak_result["incomplete_responses"],
                            "met": soak_result["incomplete_responses"] == 0},
        "soak_plain_rss_growth": {"target": "< 10% from request 50 to the end", "measured": growth,
                            "met": growth is not None and growth < 0.10},
    }
    path = write_result(args.out, {
        "setup": {"model": "SmolLM2-135M-Instruct (the demo model), plain HF folder",
                  "model_dir": str(model_dir), "device": "cpu", "dtype": "float32", "greedy": True,
                  "new_tokens": args.new_tokens, "requests_per_client": args.rounds,
                  "limit_worker_concurrency_both": args.limit_worker_concurrency,
                  "omp_num_threads_both": args.threads or "torch default",
                  "omp_wait_policy_both": args.omp_wait_policy,
                  "client": "controller /get_worker_address, then the worker's /worker_generate_stream",
                  "load_average_before": [round(x, 2) for x in load_before],
                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                  "note": "a machine shared with other jobs: absolute figures are noisy, the ratio of the "
                          "interleaved runs is the reading to trust"},
        "baseline": {"name": "fastchat.serve.model_worker (fschat 0.2.36), same controller, same model, same run",
                     "patch": "fastchat.utils.get_context_length replaced by config.max_position_embeddings "
                              "before start (KeyError 'factor' under transformers 5; removing rope_scaling/"
                              "rope_parameters from config.json does not help: transformers refills rope_scaling)",
                     "token_count": "its usage.completion_tokens + 1 (FastChat reports the loop index)"},
        "results": levels,
        "soak": previous_section(args.out, "soak"),
        "soak_plain": {**soak_result, "through": "alternating FastChat's openai_api_server (non-streaming chat "
                                           "completions) and bayling.serve.openai_api (streaming)"},
        "targets": targets,
        "gpu": "no GPU device was lent to this session: the 8-client figures on a randomly initialised "
               "7B-shaped model were not measured",
    })
    print(f"wrote {path}")


def previous_section(name: str, key: str) -> object:
    """A section of the result file as it stands (None when absent), to keep it across a partial run."""
    try:
        return json.loads((RESULTS / f"{name}.json").read_text()).get(key)
    except (OSError, ValueError):
        return None


def soak_under_faults(args: argparse.Namespace) -> None:
    """`--soak`: the launcher's stack under faults; writes the `soak` section, keeping the rest of the file."""
    import os

    from bench.serve_soak import run

    env = {"HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    result = run(Path(tempfile.mkdtemp(prefix="bench-soak-")), args.soak_requests, args.soak_concurrency,
                 args.soak_tokens, args.soak_kill_at, args.soak_timeout, env)
    print(json.dumps(result, indent=1), flush=True)
    path = RESULTS / f"{args.out}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["soak"] = {"command": command_line(), "machine": machine(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "stack": "python -m bayling.serve --openai-api bayling --no-web --device cpu (demo model, "
                            "FastChat's controller, our worker and OpenAI API; the launcher restarts the worker)",
                   "omp_num_threads": args.threads or "torch default",
                   "load_average_before": [round(x, 2) for x in load_before],
                   "load_average_after": [round(x, 2) for x in os.getloadavg()], **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(f"wrote the soak section of {path}; all checks met: {result['all_met']}")


if __name__ == "__main__":
    main()
