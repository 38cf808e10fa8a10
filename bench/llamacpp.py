"""The llama.cpp backend on the demo GGUF (CPU, 2 threads): single-stream decode, ours vs
llama_cpp.Llama's own generation on the same file and vs our torch backend; cold start of `python
chat.py` to its first answer; peak RSS of chat on each backend.

    .venv/bin/python bench/llamacpp.py [--tokens 128] [--rounds 5]

Single stream: the three run in turn, round after round (so a change in the machine's load hits all
three alike); per contestant the median of the rounds; greedy, ignore EOS, "Once upon a time".
Cold start: `python chat.py --style programmatic` (auto backend: llama.cpp on the demo) from process
start to the first byte of its answer on stdout, warm disk (a first run is discarded), median of 3.
Peak RSS: the same chat answering one question with 64 new tokens, per backend, the child's maximum
resident set size. Writes bench/results/llamacpp.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

PROMPT = "Once upon a time"
THREADS = 2
QUESTION = "What is the capital of France?\n"
# Runs a child and prints its peak RSS (KiB): RUSAGE_CHILDREN of a process whose only child it is.
RSS_WRAPPER = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], input=%r, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""" % QUESTION


class LlamaOwn:
    """llama_cpp.Llama's own generation loop on the same file."""

    def __init__(self, path: str) -> None:
        import llama_cpp

        # flash attention as our runner has it (llama_cpp.Llama's default is off)
        self.llm = llama_cpp.Llama(path, n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False,
                                   flash_attn=True)
        self.ids = self.llm.tokenize(PROMPT.encode(), add_bos=False)

    def rate(self, n: int) -> float:
        self.llm.reset()
        gen = self.llm.generate(self.ids, temp=0.0, top_k=1, reset=True)
        next(gen)  # prefill + first token
        t = time.perf_counter()
        for _ in range(n - 1):
            next(gen)
        return (n - 1) / (time.perf_counter() - t)


class Ours:
    """Our engine (the chat path's driver) on one backend."""

    def __init__(self, backend: str) -> None:
        from bayling.engine.driver import build_engine
        from bayling.loading import ModelArgs, load_model

        self.lm = load_model(ModelArgs(backend=backend, device="cpu"))
        self.engine = build_engine(self.lm.model, self.lm.tokenizer, max_num_seqs=1)
        self.ids = list(self.lm.tokenizer(PROMPT)["input_ids"])
        self.count = 0

    def rate(self, n: int) -> float:
        from bayling.engine.driver import stream
        from bayling.engine.request import OutputKind, Request
        from bayling.params import GenerationParams

        self.count += 1
        params = GenerationParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        it = stream(self.engine, Request(f"r{self.count}", self.ids, params, OutputKind.DELTA))
        next(it)  # prefill + first token
        t, count = time.perf_counter(), 0
        for out in it:
            count = out.completion_tokens
        return (count - 1) / (time.perf_counter() - t)


def single_stream(n: int, rounds: int) -> dict:
    import bayling.engine.llama_runner as lr
    from bayling.demo import demo_gguf_path

    lr.default_threads = lambda: THREADS
    contestants = {"ours_llama.cpp": Ours("llama.cpp"), "llama_cpp.Llama": LlamaOwn(str(demo_gguf_path())),
                   "ours_torch": Ours("torch")}
    for c in contestants.values():
        c.rate(8)  # warm-up
    rates: dict = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, c in contestants.items():
            rates[name].append(round(c.rate(n), 2))
    median = {name: round(statistics.median(v), 2) for name, v in rates.items()}
    return {"new_tokens": n, "rounds": rounds, "tokens_per_s_median": median, "tokens_per_s_rounds": rates,
            "ratio_ours_llama.cpp_over_llama_cpp_Llama": round(median["ours_llama.cpp"] / median["llama_cpp.Llama"], 3),
            "ratio_ours_llama.cpp_over_ours_torch": round(median["ours_llama.cpp"] / median["ours_torch"], 2)}


def chat_command(backend: str, new_tokens: int) -> list[str]:
    return [sys.executable, str(ROOT / "chat.py"), "--style", "programmatic", "--temperature", "0",
            "--max-new-tokens", str(new_tokens), "--backend", backend]


def child_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS))


def first_answer_s(backend: str) -> float:
    """Seconds from starting `python chat.py` to the first byte of its answer."""
    t = time.perf_counter()
    proc = subprocess.Popen(chat_command(backend, 16), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=child_env(), cwd=ROOT)
    proc.stdin.write(QUESTION.encode())
    proc.stdin.flush()
    proc.stdout.read(1)
    seconds = time.perf_counter() - t
    proc.stdin.close()
    proc.wait(120)
    return seconds


def cold_start() -> dict:
    out = {}
    for backend in ("auto", "torch"):
        first_answer_s(backend)  # warm the disk cache (and, for torch, the conversion cache)
        runs = [round(first_answer_s(backend), 2) for _ in range(3)]
        out[backend] = {"seconds_median": statistics.median(runs), "runs": runs}
    out["auto"]["backend"] = "llama.cpp"
    return out


def peak_rss() -> dict:
    out = {}
    for backend in ("llama.cpp", "torch"):
        r = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *chat_command(backend, 64)], capture_output=True,
                           text=True, env=child_env(), cwd=ROOT, check=True)
        out[backend] = round(int(r.stdout.strip()) / 1024, 1)
    return {"chat_peak_rss_mib": out, "ratio_torch_over_llama.cpp": round(out["torch"] / out["llama.cpp"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    result = {"single_stream_decode": single_stream(a.tokens, a.rounds),
              "cold_start_chat_to_first_answer_byte": cold_start(), "peak_rss": peak_rss(),
              "targets": {"ours_llama.cpp / llama_cpp.Llama": ">= 0.95", "ours_llama.cpp / ours_torch": ">= 5",
                          "cold start (llama.cpp)": "<= 2 s"}}
    print(write_result("llamacpp", result).read_text())


if __name__ == "__main__":
    main()
