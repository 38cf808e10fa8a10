"""The llama.cpp backend on the demo GGUF (CPU, 2 threads): single-stream decode, ours vs
llama_cpp.Llama's own generation on the same file, and cold start to the first token.

    .venv/bin/python bench/llamacpp.py [--tokens 64]

Writes bench/results/llamacpp.json. Runs on a shared machine: compare numbers within one run only.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402

PROMPT = "Once upon a time"
THREADS = 2
COLD_START = """
import sys, time
t0 = time.perf_counter()
from bayling.loading import ModelArgs, load_model
from bayling.generation import generate_stream
from bayling.params import GenerationParams
m = load_model(ModelArgs(backend=sys.argv[1]))
for chunk in generate_stream(m.model, m.tokenizer, "Hello", GenerationParams(temperature=0.0, max_new_tokens=4)):
    if chunk.text:
        break
print(time.perf_counter() - t0, 'torch' in sys.modules)
"""


def llama_own(path: str, n: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    best = 0.0
    for _ in range(2):
        llm.reset()
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)  # prefill + first token
        t = time.perf_counter()
        for _ in range(n - 1):
            next(gen)
        best = max(best, (n - 1) / (time.perf_counter() - t))
    llm.close()
    return best


def ours(n: int) -> float:
    from bayling.engine.driver import build_engine, stream
    from bayling.engine.request import OutputKind, Request
    from bayling.loading import ModelArgs, load_model
    from bayling.params import GenerationParams

    import bayling.engine.llama_runner as lr

    lr.default_threads = lambda: THREADS
    m = load_model(ModelArgs(backend="llama.cpp"))
    engine = build_engine(m.model, m.tokenizer, max_num_seqs=1)
    params = GenerationParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    best = 0.0
    for r in range(2):
        it = stream(engine, Request(f"r{r}", m.tokenizer(PROMPT)["input_ids"], params, OutputKind.DELTA))
        next(it)
        t, count = time.perf_counter(), 0
        for out in it:
            count = out.completion_tokens
        best = max(best, (count - 1) / (time.perf_counter() - t))
    return best


def cold_start(backend: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", COLD_START, backend], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    secs, torch = out.stdout.split()
    return {"seconds": round(float(secs), 2), "imports_torch": torch == "True"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    from bayling.demo import demo_gguf_path

    own = llama_own(str(demo_gguf_path()), a.tokens)
    mine = ours(a.tokens)
    cold_start("llama.cpp")  # warm the disk cache
    result = {
        "note": "2 CPU cores shared with four other sessions' jobs: absolute numbers are noisy; ratios are "
                "from the same run",
        "single_stream_decode_tokens_per_s": {"ours_llama_cpp": round(mine, 1), "llama_cpp_Llama": round(own, 1),
                                              "ratio": round(mine / own, 3)},
        "cold_start_to_first_token": {"llama.cpp": cold_start("llama.cpp"), "torch": cold_start("torch")},
        "not_measured": ["serving at 1/8/16 clients vs llama-server", "peak RSS", "export", "GPU (no device lent)"],
    }
    print(write_result("llamacpp", result).read_text())


if __name__ == "__main__":
    main()
