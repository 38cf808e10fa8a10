"""The stack under abuse (issue 9): real controller, worker and our OpenAI API on 127.0.0.1.

Huge or malformed requests never stall other users, every bad request is a 4xx with a message
(before any stream byte), broken workers are 502s, clients that leave are aborted on the worker.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from stack import free_port, http_json, running, start_controller, start_openai_server, start_worker

MODEL = "SmolLM2-135M-Instruct"
JSON = {"Content-Type": "application/json"}
TIMEOUT = 120
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("abuse-logs")
    with running() as started:
        ctl = started.add(start_controller(logs, heart_beat_expiration=4))
        worker = started.add(start_worker(ctl.url, logs, heart_beat_interval=1,
                                          args=["--limit-worker-concurrency", "4", "--stream-interval", "1"]))
        api = started.add(start_openai_server(ctl.url, logs, ours=True))
        locked = started.add(start_openai_server(ctl.url, logs, ours=True, args=["--api-key", KEY]))
        yield {"controller": ctl, "worker": worker, "api": api, "locked": locked}


def batching(stack):
    return http_json(stack["worker"].url + "/worker_get_status")["batching"]


def test_status_answers_fast_while_huge_requests_are_refused_or_prepared(stack):
    worker, ctl = stack["worker"].url, stack["controller"].url
    gaps, latencies, stop = [], [], threading.Event()

    def stream():
        payload = {"prompt": "Once upon a time", "max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}
        with requests.post(worker + "/worker_generate_stream", json=payload, stream=True, timeout=TIMEOUT) as r:
            last = None
            for _ in r.iter_content(chunk_size=None):
                now = time.monotonic()
                if last is not None and watching.is_set():
                    gaps.append(now - last)
                last = now
                if stop.is_set():
                    return

    def poll():
        while not stop.is_set():
            t0 = time.monotonic()
            requests.post(worker + "/worker_get_status", timeout=10).raise_for_status()
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)

    watching = threading.Event()
    streamer, poller = threading.Thread(target=stream), threading.Thread(target=poll)
    streamer.start()
    time.sleep(1.0)
    poller.start()
    try:
        watching.set()
        huge = json.dumps({"prompt": "x" * (20 << 20)}).encode()
        r = requests.post(worker + "/worker_generate_stream", data=huge, headers=JSON, timeout=60)
        assert json.loads(r.content.rstrip(b"\0"))["error_code"] == 40302 and "--max-request-bytes" in r.text
        time.sleep(0.5)
        watching.clear()
        # 400 messages (~200 KB): fitted off the event loop, then prefilled (on the current engine a long
        # prefill holds the batch: the stream's gaps are measured around the refusal only).
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "words " * 80}
                    for i in range(399)] + [{"role": "user", "content": "Name a fruit."}]
        assert len(json.dumps(messages)) > 190_000
        with requests.post(worker + "/worker_generate_stream", json={"messages": messages, "max_new_tokens": 4096},
                           stream=True, timeout=TIMEOUT) as r:
            first = json.loads(next(r.iter_content(chunk_size=None)).split(b"\0")[0])
        assert first["error_code"] == 0 and first["dropped_messages"] > 300, first
        assert MODEL in http_json(ctl + "/list_models")["models"]
    finally:
        stop.set()
        poller.join(30)
        streamer.join(TIMEOUT)
    # The target is 200 ms; on this shared 2-core machine a rare scheduling hiccup gets a margin, far
    # below the 5 s after which FastChat's controller gives up on a worker.
    latencies.sort()
    assert len(latencies) > 20 and latencies[int(len(latencies) * 0.99)] < 0.2 and latencies[-1] < 1.0, latencies[-5:]
    assert gaps and max(gaps) < 2.0, sorted(gaps)[-5:]  # the running stream kept getting tokens


def sse(response):
    lines = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(e) for e in lines[:-1]]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8,
        "temperature": 0}


@pytest.mark.parametrize("path,raw,status,words", [
    ("/v1/completions", b'{"model": "M", "prompt": "\\ud800"}', 400, "Unicode"),
    ("/v1/chat/completions", json.dumps({**CHAT, "stream": True, "stream_options": "yes"}).encode(), 400,
     "stream_options"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}).encode(), 400, "'text' must be a string"),
    ("/v1/chat/completions", json.dumps({**CHAT, "temperature": 1e999}).encode(), 400, "temperature"),
    ("/v1/chat/completions", json.dumps({**CHAT, "stream": True, "temperature": float("inf")}).encode(), 400,
     "temperature"),
    ("/v1/chat/completions", json.dumps({**CHAT, "repetition_penalty": 1e-300}).encode(), 400, "repetition_penalty"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "echo": "false"}).encode(), 400, "echo"),
    ("/v1/chat/completions", json.dumps({**CHAT, "n": True}).encode(), 400, "'n'"),
    ("/v1/chat/completions", json.dumps({**CHAT, "tools": [{"type": "function"}], "tool_choice": "auto"}).encode(),
     400, "tools, tool_choice"),
    ("/v1/chat/completions", json.dumps({**CHAT, "response_format": {"type": "json_object"}}).encode(), 400,
     "response_format"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "suffix": "end"}).encode(), 400, "suffix"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt lists"),
    ("/v1/chat/completions", json.dumps({**CHAT, "stop": ["s"] * 100}).encode(), 400, "--max-stop-strings"),
    ("/v1/chat/completions", json.dumps({**CHAT, "model": "nope", "stream": True}).encode(), 404, "nope"),
])
def test_bad_openai_requests_are_4xx_with_a_message(stack, path, raw, status, words):
    r = requests.post(stack["api"].url + path, data=raw, headers=JSON, timeout=60, stream=True)
    assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text
    assert words in r.json()["message"], r.json()


def test_worker_refuses_a_lone_surrogate_and_non_finite_params(stack):
    for raw in (b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "temperature": Infinity}',
                b'{"prompt": "hi", "echo": "false"}'):
        r = requests.post(stack["worker"].url + "/worker_generate", data=raw, headers=JSON, timeout=30)
        assert r.status_code == 200 and r.json()["error_code"] in (40001, 40302), r.text


def test_post_routes_accept_only_json(stack):
    body = json.dumps(CHAT)
    r = requests.post(stack["api"].url + "/v1/chat/completions", data=body, headers={"Content-Type": "text/plain"},
                      timeout=30)
    assert r.status_code == 415
    r = requests.post(stack["worker"].url + "/worker_generate", data=json.dumps({"prompt": "hi"}),
                      headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415
    assert "access-control-allow-origin" not in requests.options(
        stack["api"].url + "/v1/chat/completions", timeout=30,
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}).headers


def test_api_key(stack):
    url = stack["locked"].url + "/v1/chat/completions"
    assert requests.post(url, json=CHAT, timeout=30).status_code == 401
    assert requests.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    r = requests.post(url, json=CHAT, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_models_by_id_health_metrics_and_usage_chunk(stack):
    api = stack["api"].url
    assert requests.get(f"{api}/v1/models/{MODEL}", timeout=30).json()["id"] == MODEL
    assert requests.get(f"{api}/v1/models/nope", timeout=30).status_code == 404
    assert requests.get(f"{api}/health", timeout=30).status_code == 200
    assert requests.get(stack["worker"].url + "/health", timeout=30).status_code == 200
    with requests.post(api + "/v1/chat/completions", json={**CHAT, "stream": True,
                                                            "stream_options": {"include_usage": True}},
                       stream=True, timeout=TIMEOUT) as r:
        events = sse(r)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert all(e["usage"] is None for e in events[:-1])
    text = requests.get(stack["worker"].url + "/metrics", timeout=30).text
    for name in ("bayling_worker_requests_total", "bayling_worker_generation_tokens_total",
                 "bayling_worker_time_to_first_token_seconds_bucket", "bayling_worker_request_latency_seconds_count",
                 "bayling_worker_requests_running", "bayling_worker_requests_waiting"):
        assert name in text, name
    assert 'bayling_worker_requests_total{outcome="length"}' in text


def test_non_streaming_request_is_aborted_when_its_client_leaves(stack):
    before = batching(stack)
    body = {**CHAT, "max_tokens": 100000, "ignore_eos": True}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(stack["api"].url + "/v1/chat/completions", json=body, timeout=(5, 3))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and batching(stack)["aborted"] == before["aborted"]:
        time.sleep(0.2)
    after = batching(stack)
    assert after["aborted"] == before["aborted"] + 1 and after["running"] == 0
    assert after["tokens"] - before["tokens"] < 500


class _Broken(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/worker_get_status":
            body, status = json.dumps({"model_names": ["broken"], "speed": 1, "queue_length": 0}).encode(), 200
        else:
            body, status = b"<html><body>Internal Server Error</body></html>", 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_broken_worker_is_a_502_with_a_message(stack):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        http_json(stack["controller"].url + "/register_worker",
                  {"worker_name": address, "check_heart_beat": False, "worker_status": None})
        for stream in (False, True):
            r = requests.post(stack["api"].url + "/v1/chat/completions", timeout=60,
                              json={**CHAT, "model": "broken", "stream": stream})
            assert r.status_code == 502 and "HTTP 500" in r.json()["message"], r.text
    finally:
        server.shutdown()
