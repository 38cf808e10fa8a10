"""GGUF export of a random ~1.5 GB LLaMA: peak RSS and wall time, F16 and Q4_K_M.

    .venv/bin/python bench/export.py             # writes bench/results/export.json

Each export runs as its own process; peak RSS is VmHWM from /proc/<pid>/status, polled until it exits.
The baseline measured in the same run is a process that only imports the exporter (Python, torch, numpy,
gguf: the fixed cost), so peak minus baseline is what the model's tensors cost.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench.common import write_result  # noqa: E402

# The same ~0.74 B-parameter shape as bench/delta.py: 1.5 GB in fp16.
BENCH_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                    tie_word_embeddings=False)
QUANTS = ("F16", "Q4_K_M")
POLL_S = 0.01
MIB = 2**20


def build_model(folder: Path) -> int:
    import torch
    from tiny import build_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BENCH_CONFIG)).to(torch.float16)
    model.save_pretrained(folder, max_shard_size="500MB")
    build_bpe_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(argv: list[str]) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(POLL_S)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with exit code {proc.returncode}")
    return round(peak * 1024 / MIB, 1), round(seconds, 2)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        model_bytes = build_model(work / "model")
        baseline, _ = measure([sys.executable, "-c", "import bayling.export, bayling.delta.shards, torch, gguf"])
        runs = {}
        for quant in QUANTS:
            out = work / f"model.{quant}.gguf"
            rss, seconds = measure([sys.executable, "-m", "bayling.export", "--model-path", str(work / "model"),
                                    "--gguf", str(out), "--quant", quant])
            runs[quant] = {"peak_rss_mib": rss, "seconds": seconds, "file_mib": round(out.stat().st_size / MIB, 1),
                           "peak_rss_over_baseline_mib": round(rss - baseline, 1)}
            out.unlink()
        largest = BENCH_CONFIG["vocab_size"] * BENCH_CONFIG["hidden_size"] * 2
        path = write_result("export", {
            "model": {"config": BENCH_CONFIG, "fp16_mib": round(model_bytes / MIB, 1),
                      "largest_tensor_mib": round(largest / MIB, 1)},
            "baseline_import_only_peak_rss_mib": baseline, "runs": runs})
        print(path.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
