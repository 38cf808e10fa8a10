"""Helpers for the evaluation tests, and a small OpenAI-compatible server over the core engine.

Run as a script, it serves POST /v1/chat/completions and GET /v1/models for one model (the
demo model by default) on 127.0.0.1: a real process speaking real HTTP for `judge` to call.
It is the fallback judge endpoint while the FastChat worker (model_worker.py) is not there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_eval(*args: str, timeout: int = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """python -m bayling.eval ARGS in the repository root."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([PYTHON, "-m", "bayling.eval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# --- the fallback OpenAI-compatible server -------------------------------------------------------

def _serve(port: int, model_path: Optional[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from bayling.generation import generate
    from bayling.loading import ModelArgs, load_model
    from bayling.params import GenerationParams

    loaded = load_model(ModelArgs(model_path=model_path, device="cpu"))
    lock = threading.Lock()  # one model: one generation at a time

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": loaded.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                params = GenerationParams.from_request(
                    {"temperature": req.get("temperature", 0.7), "top_p": req.get("top_p"),
                     "max_new_tokens": req.get("max_tokens") or 256})
                prompt = loaded.tokenizer.apply_chat_template(req["messages"], tokenize=False,
                                                              add_generation_prompt=True)
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": {"message": str(e)}})
                return
            with lock:
                out = generate(loaded.model, loaded.tokenizer, prompt, params)
            self._send(200, {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": req.get("model", loaded.name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": out.usage})

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a small OpenAI-compatible chat server for tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path", default=None, help="default: the demo model")
    ns = parser.parse_args()
    _serve(ns.port, ns.model_path)
