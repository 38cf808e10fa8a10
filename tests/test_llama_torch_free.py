"""The llama.cpp path (auto on the demo model) chats without importing torch or transformers,
and without the GGUF -> safetensors conversion cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

ROOT = Path(__file__).resolve().parents[1]
CHAT = """
import json, sys
from bayling.chat.__main__ import main
sys.argv = ["chat.py", "--style", "programmatic", "--temperature", "0", "--max-new-tokens", "8"]
main()
print(json.dumps({m: m in sys.modules for m in ("torch", "transformers", "bayling.engine.numpy_sampler")}),
      file=sys.stderr)
"""


def test_chat_on_the_demo_imports_no_torch(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), BAYLING_CACHE=str(cache), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", CHAT], input="What is the capital of France?\n", text=True,
                            capture_output=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()  # an answer
    assert "on llama.cpp" in result.stderr
    modules = json.loads(result.stderr.strip().splitlines()[-1])
    assert modules == {"torch": False, "transformers": False, "bayling.engine.numpy_sampler": True}
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # no conversion cache
