"""The serving stack as real processes on 127.0.0.1: FastChat's controller and OpenAI server, our worker
(`python model_worker.py`, the demo model on the CPU) and our OpenAI server. One stack per backend (torch,
llama.cpp); answers are checked against that backend's own reference (tests/backends.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from backends import BACKENDS, demo, reference
from bayling.serve.launch import default_sigint
from bayling.templates import Conversation, Message, get_template
from stack import (ROOT, free_port, http_json, start_controller, start_openai_server, start_worker, stop_all,
                   wait_http)

MODEL = "SmolLM2-135M-Instruct"
CHAT_PROMPT = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
STOCK_KEYS = ["text", "error_code", "usage", "finish_reason", "logprobs"]
TIMEOUT = 120
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, tmp_path_factory):
    backend = request.param
    logs = tmp_path_factory.mktemp(f"serve-logs-{backend}")
    started = []
    try:
        ctl = start_controller(logs)
        started.append(ctl)
        worker = start_worker(ctl.url, logs, args=["--limit-worker-concurrency", "4", "--stream-interval", "1"],
                              backend=backend)
        started.append(worker)
        fastchat_api = start_openai_server(ctl.url, logs)
        started.append(fastchat_api)
        our_api = start_openai_server(ctl.url, logs, ours=True)
        started.append(our_api)
        yield {"controller": ctl, "worker": worker, "fastchat_api": fastchat_api, "api": our_api, "logs": logs,
               "backend": backend}
    finally:
        stop_all(reversed(started))


def raw_stream(url, payload, timeout=TIMEOUT):
    """POST and return the NUL-delimited chunks as raw bytes (without the delimiter)."""
    r = requests.post(url, json=payload, stream=True, timeout=timeout)
    body = b"".join(r.iter_content(chunk_size=None))
    assert r.status_code == 200 and body.endswith(b"\0"), body[-200:]
    return body[:-1].split(b"\0")


def status(stack):
    return http_json(stack["worker"].url + "/worker_get_status")


def greedy(stack, prompt, max_new_tokens):
    """The backend's own greedy answer, made in this process (torch: one thread, as the stack's worker runs)."""
    return reference(stack["backend"]).greedy(prompt, max_new_tokens, threads=1).text


def prompt_tokens(stack, prompt):
    return len(reference(stack["backend"]).ids(prompt))


def window(stack) -> int:
    """The longest conversation: the demo's 8192 tokens on torch; on llama.cpp a sequence's own KV stream,
    4096 tokens by default."""
    return {"torch": 8192, "llama.cpp": 4096}[stack["backend"]]


def test_worker_registers_with_fastchat_controller(stack):
    ctl, worker = stack["controller"], stack["worker"]
    assert http_json(ctl.url + "/list_models")["models"] == [MODEL]
    assert http_json(ctl.url + "/get_worker_address", {"model": MODEL})["address"] == worker.url
    st = status(stack)
    assert st["model_names"] == [MODEL] and st["speed"] == 1 and st["queue_length"] == 0
    assert {"decode_steps", "shared_steps", "peak_batch", "mean_batch", "running", "waiting"} <= set(st["batching"])
    assert http_json(worker.url + "/model_details")["context_length"] == window(stack)
    n = prompt_tokens(stack, CHAT_PROMPT)
    assert http_json(worker.url + "/count_token", {"prompt": CHAT_PROMPT}) == {"count": n, "error_code": 0}
    assert http_json(worker.url + "/worker_get_conv_template")["conv"]["sep_style"] == 9  # CHATML


def test_stream_protocol_byte_for_byte(stack):
    payload = {"model": MODEL, "prompt": CHAT_PROMPT, "temperature": 0, "max_new_tokens": 24, "echo": False}
    chunks = raw_stream(stack["worker"].url + "/worker_generate_stream", payload)
    previous, tokens = "", 0
    n = prompt_tokens(stack, CHAT_PROMPT)
    for raw in chunks:
        d = json.loads(raw)
        assert list(d) == STOCK_KEYS
        # exactly how fastchat.serve.model_worker encodes a step
        assert raw == json.dumps({"text": d["text"], "error_code": 0, "usage": d["usage"],
                                  "finish_reason": d["finish_reason"], "logprobs": None}).encode()
        assert d["text"].startswith(previous) and d["usage"]["completion_tokens"] > tokens
        assert d["usage"]["prompt_tokens"] == n
        assert d["usage"]["total_tokens"] == n + d["usage"]["completion_tokens"]
        previous, tokens = d["text"], d["usage"]["completion_tokens"]
    last = json.loads(chunks[-1])
    assert all(json.loads(c)["finish_reason"] is None for c in chunks[:-1])
    assert last["finish_reason"] in ("stop", "length") and len(chunks) > 3
    assert last["text"] == greedy(stack, CHAT_PROMPT, 24)

    # Through the controller's relay, and as one reply from /worker_generate: the same answer.
    relayed = raw_stream(stack["controller"].url + "/worker_generate_stream", payload)
    assert relayed[-1] == chunks[-1]
    assert requests.post(stack["worker"].url + "/worker_generate", json=payload, timeout=TIMEOUT).json() == last


def test_prompt_is_echoed_by_default_like_fastchat_workers(stack):
    payload = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_new_tokens": 4}
    reply = requests.post(stack["worker"].url + "/worker_generate", json=payload, timeout=TIMEOUT).json()
    assert reply["error_code"] == 0 and reply["text"].startswith("Once upon a time")


def test_messages_extension_renders_our_template(stack):
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a fruit."}]
    reply = requests.post(stack["worker"].url + "/worker_generate",
                          json={"messages": messages, "temperature": 0, "max_new_tokens": 12}, timeout=TIMEOUT).json()
    conv = Conversation(get_template("tokenizer"), "Answer in one word.", [Message("user", "Name a fruit.")])
    tokenizer = demo(stack["backend"]).tokenizer  # renders the chat template the worker's model carries
    assert reply["text"] == greedy(stack, conv.prompt_for_reply(tokenizer), 12)


def test_fastchat_openai_server_against_our_worker(stack):
    api = stack["fastchat_api"].url
    models = requests.get(api + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0,
            "max_tokens": 16}
    theirs = requests.post(api + "/v1/chat/completions", json=chat, timeout=TIMEOUT).json()
    assert theirs["choices"][0]["message"]["content"] and theirs["usage"]["completion_tokens"] > 0
    # FastChat renders the prompt from our conv dict, we from the tokenizer's template: same tokens, same answer.
    ours = requests.post(stack["api"].url + "/v1/chat/completions", json=chat, timeout=TIMEOUT).json()
    assert ours["choices"][0]["message"] == theirs["choices"][0]["message"]
    assert ours["usage"] == theirs["usage"]
    completion = requests.post(api + "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                                                              "temperature": 0, "max_tokens": 8},
                               timeout=TIMEOUT).json()
    assert completion["choices"][0]["text"] and completion["usage"]["completion_tokens"] == 8


def sse_events(response):
    events = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_our_openai_server_streams(stack):
    api = stack["api"].url
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0,
            "max_tokens": 16}
    whole = requests.post(api + "/v1/chat/completions", json=chat, timeout=TIMEOUT).json()
    with requests.post(api + "/v1/chat/completions", json={**chat, "stream": True,
                                                           "stream_options": {"include_usage": True}},
                       stream=True, timeout=TIMEOUT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    # With include_usage, OpenAI's shape: usage comes in one last chunk with no choices.
    usage_event, events = events[-1], events[:-1]
    assert usage_event["choices"] == [] and usage_event["usage"] == whole["usage"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]

    with requests.post(api + "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "stream": True,
                                                       "temperature": 0, "max_tokens": 8},
                       stream=True, timeout=TIMEOUT) as r:
        events = sse_events(r)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events).strip()


def test_two_concurrent_streams_share_decode_steps(stack):
    before = status(stack)["batching"]
    payload = {"model": MODEL, "prompt": CHAT_PROMPT, "temperature": 0, "max_new_tokens": 24, "ignore_eos": True,
               "echo": False}
    results = [None, None]

    def run(i):
        results[i] = raw_stream(stack["worker"].url + "/worker_generate_stream", payload)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    after = status(stack)["batching"]
    assert [json.loads(r[-1])["usage"]["completion_tokens"] for r in results] == [24, 24]
    steps = after["decode_steps"] - before["decode_steps"]
    shared = after["shared_steps"] - before["shared_steps"]
    # 48 tokens in far fewer than 46 decode steps (2 tokens come from prefills): decoded together.
    assert shared >= 12 and steps < 40 and after["peak_batch"] >= 2, (before, after)
    assert results[0][-1] == results[1][-1]


@pytest.mark.parametrize("body,code", [
    (b'{"prompt": "hi", ', 40001),
    (b'"just a string"', 40001),
    (b'{"prompt": "hi", "temperature": "hot"}', 40302),
    (b'{"prompt": "hi", "top_p": 0}', 40302),
    (b'{"prompt": "hi", "max_new_tokens": -3}', 40302),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 40001),
])
def test_bad_requests_get_error_codes(stack, body, code):
    for path in ("/worker_generate_stream", "/worker_generate"):
        r = requests.post(stack["worker"].url + path, data=body, headers=JSON, timeout=30)
        assert r.status_code == 200
        reply = json.loads(r.content.rstrip(b"\0"))
        assert reply["error_code"] == code and reply["text"] and "Traceback" not in reply["text"]
    r = requests.post(stack["api"].url + "/v1/completions", data=body, headers=JSON, timeout=30)
    assert r.status_code == 400 and r.json()["code"] in (code, 40001)


def test_over_long_prompt_gets_a_clear_error(stack):
    prompt = "hello " * 9000
    reply = requests.post(stack["worker"].url + "/worker_generate_stream", json={"prompt": prompt},
                          timeout=60).content
    assert reply.endswith(b"\0")
    err = json.loads(reply[:-1])
    assert err["error_code"] == 40303 and f"context window is {window(stack)} tokens" in err["text"]
    for api in (stack["api"].url, stack["fastchat_api"].url):
        r = requests.post(api + "/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
        assert r.status_code == 400 and r.json()["code"] == 40303, r.text


def test_disconnecting_client_frees_its_slot(stack):
    before = status(stack)["batching"]
    payload = {"model": MODEL, "prompt": CHAT_PROMPT, "max_new_tokens": 4000, "ignore_eos": True}
    r = requests.post(stack["worker"].url + "/worker_generate_stream", json=payload, stream=True, timeout=TIMEOUT)
    chunks = r.iter_content(chunk_size=None)
    next(chunks)
    assert status(stack)["queue_length"] == 1
    r.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = status(stack)
        if st["batching"]["running"] == 0 and st["queue_length"] == 0:
            break
        time.sleep(0.05)
    after = status(stack)["batching"]
    assert after["running"] == 0 and after["aborted"] == before["aborted"] + 1
    assert after["tokens"] - before["tokens"] < 400  # stopped long before its 4000 tokens


# The next two are about processes, not the model: one backend is enough (llama.cpp starts faster).
def test_killed_worker_is_dropped_by_the_controller(tmp_path):
    logs = tmp_path
    ctl = start_controller(logs, heart_beat_expiration=2)
    worker = api = None
    try:
        worker = start_worker(ctl.url, logs, heart_beat_interval=1, args=["--model-names", "doomed"],
                              backend="llama.cpp")
        api = start_openai_server(ctl.url, logs, ours=True)
        assert http_json(ctl.url + "/list_models")["models"] == ["doomed"]
        worker.kill()
        r = requests.post(api.url + "/v1/chat/completions", timeout=30,
                          json={"model": "doomed", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code >= 400 and r.json()["message"]  # a clear error, not a hang
        deadline = time.monotonic() + 20
        while http_json(ctl.url + "/list_models")["models"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert http_json(ctl.url + "/list_models")["models"] == []
    finally:
        stop_all([api, worker, ctl])


def test_one_command_starts_and_stops_the_stack(tmp_path):
    ports = [free_port() for _ in range(4)]
    cmd = [sys.executable, "-m", "bayling.serve", "--controller-port", str(ports[0]), "--worker-port", str(ports[1]),
           "--web-port", str(ports[2]), "--openai-api", "bayling", "--openai-port", str(ports[3]), "--no-web",
           "--log-dir", str(tmp_path), "--device", "cpu", "--backend", "llama.cpp"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            start_new_session=True, preexec_fn=default_sigint)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{ports[0]}" in out and f"http://127.0.0.1:{ports[3]}/v1" in out, out
        models = requests.get(f"http://127.0.0.1:{ports[3]}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0  # each child gets a grace period, one after another
        for port in (ports[0], ports[1], ports[3]):
            with pytest.raises(Exception):
                wait_http(f"http://127.0.0.1:{port}/", timeout=0.5)
    finally:
        if proc.poll() is None:
            # The children run in sessions of their own: find them before the launcher goes.
            import psutil

            children = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for child in children:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def test_logprobs_and_seed_in_the_worker_protocol(stack):
    payload = {"model": MODEL, "prompt": CHAT_PROMPT, "temperature": 0, "max_new_tokens": 6, "echo": False,
               "logprobs": 2}
    last = requests.post(stack["worker"].url + "/worker_generate", json=payload, timeout=TIMEOUT).json()
    lp = last["logprobs"]
    assert set(lp) == {"text_offset", "tokens", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    first, logprob = reference(stack["backend"]).first_logprob(CHAT_PROMPT)
    assert lp["tokens"][0] == demo(stack["backend"]).tokenizer.decode([first])
    assert lp["token_logprobs"][0] == pytest.approx(logprob, abs=1e-3)
    assert len(lp["top_logprobs"][0]) <= 2
    sampled = {"model": MODEL, "prompt": CHAT_PROMPT, "temperature": 1.0, "max_new_tokens": 12, "echo": False,
               "seed": 11, "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"0": -100}}
    runs = [requests.post(stack["worker"].url + "/worker_generate", json=sampled, timeout=TIMEOUT).json()["text"]
            for _ in range(2)]
    assert runs[0] == runs[1]
    bad = requests.post(stack["worker"].url + "/worker_generate", json={**sampled, "presence_penalty": 3},
                        timeout=TIMEOUT).json()
    assert bad["error_code"] != 0 and "presence_penalty" in bad["text"]
