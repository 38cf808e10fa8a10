"""The one engine against plain `model.generate` and against the code before it (a git worktree of b9c2f01).

    python bench/engine.py [--baseline-commit b9c2f01] [--eval-prompts 64] [--new-tokens 128]

1. single stream: chat's path (generation.generate_stream on the engine) vs `model.generate`, greedy;
2. eval `answer`: 64 prompts of mixed answer lengths at --batch-size 8, the engine (continuous refill)
   vs the old static batching (`eval/batch.generate_many` of the baseline commit, run in a subprocess
   from a temporary worktree), with the greedy outputs compared.
Demo model, CPU. The machine is shared with other jobs: compare figures within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_result  # noqa: E402

QUESTIONS = ["Name a colour.", "Write a short poem about the sea.", "What is 2 + 2?",
             "Explain photosynthesis in detail.", "Say hello.", "List five fruits and describe each one.",
             "Translate 'good morning' into French.", "Tell me a long story about a dragon."]

OLD_EVAL = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bayling.loading import ModelArgs, load_model
from bayling.params import GenerationParams
from bayling.eval.batch import generate_many
from bayling.templates import Conversation, USER, choose_template
lm = load_model(ModelArgs(device="cpu"))
tpl = choose_template(lm.name, None)
qs = json.loads(sys.argv[2]); new = int(sys.argv[3])
prompts = []
for q in qs:
    c = Conversation(tpl); c.add(USER, q); prompts.append(c.prompt_for_reply(lm.tokenizer))
p = GenerationParams(temperature=0, max_new_tokens=new)
t = time.perf_counter()
outs = generate_many(lm.model, lm.tokenizer, prompts, p, batch_size=8)
print(json.dumps({"seconds": time.perf_counter() - t, "texts": [o.text for o in outs],
                  "tokens": sum(o.completion_tokens for o in outs)}))
"""


def single_stream(lm, new_tokens: int) -> dict:
    import torch

    from bayling.generation import generate
    from bayling.params import GenerationParams
    from bayling.tokens import encode_prompt

    ids = encode_prompt(lm.tokenizer, "Tell me a long story about a dragon.")
    params = GenerationParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    generate(lm.model, lm.tokenizer, ids, GenerationParams(temperature=0, max_new_tokens=4))  # warm-up
    best = {"engine": 0.0, "generate": 0.0}
    for _ in range(2):  # interleaved, best of two: the machine is shared
        t = time.perf_counter()
        out = generate(lm.model, lm.tokenizer, ids, params)
        best["engine"] = max(best["engine"], out.completion_tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False)
        best["generate"] = max(best["generate"], new_tokens / (time.perf_counter() - t))
    return {"new_tokens": new_tokens, "engine_tok_s": round(best["engine"], 2),
            "generate_tok_s": round(best["generate"], 2), "ratio": round(best["engine"] / best["generate"], 3)}


def eval_answer(lm, questions: list[str], new_tokens: int, baseline: Path) -> dict:
    from bayling.eval.engine import EvalModel
    from bayling.eval.io import ResumableWriter
    from bayling.params import GenerationParams

    model = EvalModel.from_loaded(lm, GenerationParams(temperature=0, max_new_tokens=new_tokens), batch_size=8,
                                  show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ResumableWriter(Path(tmp) / "out.jsonl")
        t = time.perf_counter()
        model.run_single_turn(questions, writer, lambda q: q, lambda q, c: {"text": c.text, "n": c.completion_tokens},
                              "bench")
        seconds = time.perf_counter() - t
        rows = [json.loads(x) for x in (Path(tmp) / "out.jsonl").read_text().splitlines()]
    env = {**os.environ, "PYTHONPATH": str(baseline)}
    old = subprocess.run([sys.executable, "-c", OLD_EVAL, str(baseline), json.dumps(questions), str(new_tokens)],
                         capture_output=True, text=True, env=env, cwd=baseline)
    if old.returncode:
        raise RuntimeError(old.stderr[-2000:])
    old_result = json.loads(old.stdout.strip().splitlines()[-1])
    same = sum(a["text"] == b for a, b in zip(rows, old_result["texts"]))
    return {"prompts": len(questions), "batch_size": 8, "max_new_tokens": new_tokens,
            "engine_s": round(seconds, 2), "old_static_s": round(old_result["seconds"], 2),
            "speedup": round(old_result["seconds"] / seconds, 3),
            "tokens": sum(r["n"] for r in rows), "old_tokens": old_result["tokens"],
            "identical_outputs": f"{same}/{len(questions)}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-commit", default="b9c2f01")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-eval", action="store_true")
    ns = ap.parse_args()
    from bayling.loading import ModelArgs, load_model

    lm = load_model(ModelArgs(device="cpu", backend="torch"))
    result = {"single_stream": single_stream(lm, ns.new_tokens)}
    print(result, flush=True)
    if not ns.skip_eval:
        base = Path(tempfile.mkdtemp()) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), ns.baseline_commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            questions = [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(ns.eval_prompts)]
            result["eval_answer"] = eval_answer(lm, questions, ns.new_tokens, base)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    result["note"] = ("2-core CPU shared with other jobs while this ran; demo model fp32; baseline commit "
                      f"{ns.baseline_commit} in a temporary worktree, run in a subprocess in the same run")
    write_result("engine", {"machine": machine(), **result})
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
