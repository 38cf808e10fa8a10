"""`answer` on 32 prompts on the demo model: batched vs one prompt at a time, in one run.

Run: .venv/bin/python bench/eval.py   (writes bench/results/eval.json)

Baseline: the core engine, generation.generate, one prompt after another. Against it, the eval
pipeline (answer_rows: resumable writer, static batches) at --batch-size 8, 16 and 32. All use
the same model load, greedy decoding and max_new_tokens; configurations are interleaved and each
figure is the best of --repeats runs, the fairest reading on a machine shared with other work;
the process's CPU time is recorded too, as it depends less on what else the machine runs.

Threads: on a 2-core machine shared with other processes, torch's 2 intra-op threads wait on each
other at every operator whenever one is descheduled; a batch-1 decode step, made of many tiny
operators, suffers most (measured here: ~3x slower per step than with 1 thread), which would
flatter batching. The default --threads 1 keeps that artifact out of the comparison.
Every batched output is compared with the baseline's; a difference is explained by the logit gap
between the two best tokens where they part (a near-tie that fp32 rounding under padding can flip).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What are three simple ways to save water at home?", "Why is the sky blue?",
    "Give me a short recipe for pancakes.", "What is the difference between weather and climate?",
    "Write a haiku about the sea.", "How does a bicycle stay upright?",
    "Explain what a neural network is to a ten-year-old.", "List four planets of the solar system.",
    "What should I pack for a weekend hiking trip?", "Why do cats purr?",
    "Suggest a name for a small bakery.", "How can I improve my sleep?",
    "What is photosynthesis?", "Write a polite email declining a meeting invitation.",
    "What are the benefits of learning a second language?", "How do vaccines work?",
    "Describe the taste of a lemon.", "What is 15 multiplied by 12?",
    "Give three tips for a job interview.", "Why do leaves change color in autumn?",
    "What is the capital of Australia?", "Write a Python function that reverses a string.",
    "How do airplanes fly?", "What is a healthy breakfast?",
    "请介绍一下长城。", "如何学好数学？", "为什么要保护环境？", "推荐三本适合初学者的书。",
    "写一句关于春天的诗。", "怎样才能提高写作水平？", "什么是人工智能？", "请给出三条健康饮食的建议。",
]
BATCH_SIZES = (8, 16, 32)


def main(max_new_tokens: int, repeats: int, threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from bench.common import peak_rss_mib, write_result
    from bayling.eval.answer import answer_rows
    from bayling.eval.engine import EvalModel
    from bayling.generation import generate
    from bayling.tokens import encode_prompt
    from bayling.loading import ModelArgs, load_model
    from bayling.params import GenerationParams

    loaded = load_model(ModelArgs(device="cpu", backend="torch"))
    params = GenerationParams(temperature=0, max_new_tokens=max_new_tokens)
    rows = [{"question_id": i + 1, "text": q, "category": "bench"} for i, q in enumerate(PROMPTS)]
    engines = {b: EvalModel.from_loaded(loaded, params, batch_size=b, show_progress=False) for b in BATCH_SIZES}
    base_engine = engines[BATCH_SIZES[0]]
    prompts = [base_engine.conversation([r["text"]]).prompt_for_reply(loaded.tokenizer) for r in rows]

    def unbatched() -> list[dict]:
        out = []
        for p in prompts:
            chunk = generate(loaded.model, loaded.tokenizer, p, base_engine.params)
            out.append({"text": chunk.text, "tokens": chunk.completion_tokens})
        return out

    def pipeline(batch_size: int) -> list[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "answers.jsonl"
            answer_rows(engines[batch_size], rows, path)
            import json

            return [{"text": json.loads(line)["response"][0]} for line in path.read_text().splitlines()]

    generate(loaded.model, loaded.tokenizer, prompts[0], base_engine.params)  # warm up
    configs = {"unbatched (generation.generate)": unbatched,
               **{f"answer --batch-size {b}": (lambda b=b: pipeline(b)) for b in BATCH_SIZES}}
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu_times: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, list[dict]] = {}
    for r in range(repeats):
        for name, fn in configs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f} s wall, {cpu_times[name][-1]:.1f} s CPU",
                  file=sys.stderr)

    baseline_name = "unbatched (generation.generate)"
    reference = outputs[baseline_name]
    total_tokens = sum(o["tokens"] for o in reference)
    base_best = min(times[baseline_name])
    results = {}
    for name in configs:
        best = min(times[name])
        diffs = [i for i, (a, b) in enumerate(zip(outputs[name], reference)) if a["text"] != b["text"]]
        best_cpu = min(cpu_times[name])
        results[name] = {"best_s": round(best, 2), "runs_s": [round(t, 2) for t in times[name]],
                         "tokens_per_s": round(total_tokens / best, 1),
                         "speedup_vs_unbatched": round(base_best / best, 2),
                         "best_cpu_s": round(best_cpu, 2), "cpu_runs_s": [round(t, 2) for t in cpu_times[name]],
                         "cpu_speedup_vs_unbatched": round(min(cpu_times[baseline_name]) / best_cpu, 2),
                         "outputs_differing_from_unbatched": len(diffs),
                         "differences": [explain(loaded, prompts[i], reference[i]["text"], outputs[name][i]["text"],
                                                 base_engine.params, encode_prompt, i) for i in diffs]}
    write_result("eval", {
        "description": "answer on 32 prompts (24 English, 8 Chinese) on the demo model, CPU, greedy; "
                       "batched static decoding vs one prompt at a time; best of the runs",
        "baseline": baseline_name,
        "settings": {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "repeats": repeats,
                     "completion_tokens": total_tokens, "torch_threads": torch.get_num_threads(),
                     "model": loaded.name},
        "results": results, "peak_rss_mib": peak_rss_mib()})
    for name, r in results.items():
        print(f"{name:<34} {r['best_s']:7.1f} s  {r['tokens_per_s']:7.1f} tok/s  x{r['speedup_vs_unbatched']:<5} "
              f"(CPU time x{r['cpu_speedup_vs_unbatched']})  differences: {r['outputs_differing_from_unbatched']}")


def explain(loaded, prompt: str, want: str, got: str, params, encode_prompt, index: int) -> dict:
    """Where a batched answer parts from the unbatched one, and how close the two best tokens were there."""
    import torch

    tok = loaded.tokenizer
    a, b = tok(want, add_special_tokens=False)["input_ids"], tok(got, add_special_tokens=False)["input_ids"]
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ids = encode_prompt(tok, prompt) + a[:at]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return {"prompt_index": index, "first_differing_token": at,
            "top2_logit_gap_unbatched": round(float(top.values[0] - top.values[1]), 5),
            "unbatched": want[:120], "batched": got[:120]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default); see the note at the top")
    ns = parser.parse_args()
    main(ns.max_new_tokens, ns.repeats, ns.threads)
