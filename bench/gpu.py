"""GPU figures for 7B/13B-shaped random LLaMAs: load time, peak memory, decode tokens/s, engine throughput.

    python bench/gpu.py                 # CUDA: 7B and 13B shapes, fp16 (where it fits), 8-bit, 4-bit
    python bench/gpu.py --tiny          # the same code on a tiny model on the CPU (the test runs this)

For each shape and precision: load time (random init, saved once, loaded as the CLI loads models),
peak GPU memory, single-stream decode tokens/s through the engine vs plain `model.generate`, and
aggregate tokens/s at 1, 8 and 32 concurrent requests through the engine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_result  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "tiny": (64, 128, 2, 4),
}


def build(folder: Path, shape: str, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta" if shape != "tiny" else "cpu"):
        model = LlamaForCausalLM(config)
    if shape != "tiny":  # materialise small random weights in fp16 on the CPU, layer by layer
        model = model.to_empty(device="cpu").to(torch.float16)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder


def measure(folder: Path, quant: str, device: str, new_tokens: int, concurrency: list[int]) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    from bayling.engine.driver import build_engine
    from bayling.engine.request import OutputKind, Request
    from bayling.loading import ModelArgs
    from bayling.params import GenerationParams

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # load_model needs a tokenizer; the engine only needs ids, so load the weights directly as it would.
    from transformers import AutoModelForCausalLM

    from bayling.loading import quantization_config
    args = ModelArgs(model_path=str(folder), device=device, load_8bit=quant == "8bit", load_4bit=quant == "4bit")
    dtype = torch.float16 if cuda else torch.float32
    q = quantization_config(args, dtype if cuda else torch.bfloat16)
    kwargs = {"dtype": dtype}
    if q is not None:
        kwargs.update(quantization_config=q, device_map={"": 0 if cuda else "cpu"})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if q is None:
        model.to(device)
    model.eval()
    load_s = time.perf_counter() - t0
    prompt = list(range(3, 35))
    params = GenerationParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        dev = next(model.parameters()).device
        model.generate(torch.tensor([prompt], device=dev), max_new_tokens=4, do_sample=False, eos_token_id=None)
        sync()
        t = time.perf_counter()
        model.generate(torch.tensor([prompt], device=dev), max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, min_new_tokens=new_tokens)
        sync()
        hf_tps = new_tokens / (time.perf_counter() - t)

    engine = build_engine(model, None, context_len=4096, max_num_seqs=max(concurrency),
                          max_num_batched_tokens=max(512, max(concurrency)))
    engine.tokenizer = _NullTokenizer()

    def run(n: int) -> float:
        for i in range(n):
            engine.add_request(Request(f"{n}-{i}", prompt, params, OutputKind.FINAL))
        sync()
        t = time.perf_counter()
        tokens = 0
        while engine.has_unfinished():
            tokens += sum(o.completion_tokens for o in engine.step() if o.finished)
        sync()
        return tokens / (time.perf_counter() - t)

    run(1)  # warm-up
    ours = run(1)
    aggregate = {str(n): round(run(n), 2) for n in concurrency}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del engine, model
    return {"load_s": round(load_s, 2), "peak_gpu_gib": None if peak is None else round(peak, 2),
            "decode_tok_s_engine": round(ours, 2), "decode_tok_s_generate": round(hf_tps, 2),
            "engine_vs_generate": round(ours / hf_tps, 3), "aggregate_tok_s": aggregate}


class _NullTokenizer:
    """Random models have no tokenizer: detokenize every id to one character."""

    def decode(self, ids, **kwargs):
        return "x" * len(ids)

    def convert_ids_to_tokens(self, ids):
        return "x" if isinstance(ids, int) else ["x" for _ in ids]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (the code path, not the figures)")
    ap.add_argument("--shapes", default="7b,13b")
    ap.add_argument("--quant", default="fp16,8bit,4bit")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--output", default=None, help="result name (default gpu, or gpu-tiny with --tiny)")
    ap.add_argument("--results-dir", type=Path, default=None, help="where to write NAME.json (default bench/results)")
    ns = ap.parse_args(argv)
    import torch

    device = "cpu" if ns.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny for the CPU code path", file=sys.stderr)
        return 2
    shapes = ["tiny"] if ns.tiny else ns.shapes.split(",")
    quants = ["fp32"] if ns.tiny else ns.quant.split(",")
    concurrency = [int(c) for c in ns.concurrency.split(",")]
    results = {}
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build(Path(tmp), shape, 32000 if shape != "tiny" else 600)
            for quant in quants:
                try:
                    results[f"{shape}/{quant}"] = measure(folder, quant if quant != "fp32" else "none", device,
                                                          ns.new_tokens, concurrency)
                except Exception as e:  # e.g. fp16 13B does not fit: record it, go on
                    results[f"{shape}/{quant}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(shape, quant, results[f"{shape}/{quant}"], flush=True)
    write_result(ns.output or ("gpu-tiny" if ns.tiny else "gpu"),
                 {"machine": machine(), "results": results,
                  "note": "random weights; prompt 32 tokens; greedy; ignore_eos"},
                 *([ns.results_dir] if ns.results_dir else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
