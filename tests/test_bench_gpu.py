"""bench/gpu.py --tiny runs the GPU benchmark's code on the CPU, so it cannot rot."""
import json
import subprocess
import sys

from eval_helpers import ROOT


def test_gpu_bench_tiny_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--new-tokens", "6",
                           "--concurrency", "1,3", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-tiny.json").read_text())
    tiny = result["results"]["tiny/fp32"]
    assert "error" not in tiny, tiny
    assert tiny["decode_tok_s_engine"] > 0 and tiny["decode_tok_s_generate"] > 0
    assert set(tiny["aggregate_tok_s"]) == {"1", "3"} and all(v > 0 for v in tiny["aggregate_tok_s"].values())
