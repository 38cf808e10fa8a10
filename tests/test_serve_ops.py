"""Serving as an operator runs it (issues 9 and 11), with real processes on 127.0.0.1: SIGTERM drains the
worker, the launcher stops it that way, CORS and JSON-only POSTs, honest 503s when the controller or
every worker is gone, OpenAI's n / seed / logprobs, and the package running outside the checkout."""
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from stack import (ROOT, free_port, http_json, launched, running, start_controller, start_openai_server,
                   start_worker, stop_all)

MODEL = "SmolLM2-135M-Instruct"
JSON = {"Content-Type": "application/json"}
TIMEOUT = 120
ORIGIN = "http://a.example"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 6,
        "temperature": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ops-logs")
    with running() as started:
        ctl = started.add(start_controller(logs))
        worker = started.add(start_worker(ctl.url, logs, args=["--stream-interval", "1"]))
        api = started.add(start_openai_server(ctl.url, logs, ours=True))
        cors = started.add(start_openai_server(ctl.url, logs, ours=True, args=["--allowed-origins", ORIGIN]))
        yield {"controller": ctl, "worker": worker, "api": api, "cors": cors}


def chunks(response) -> list[dict]:
    """The worker's NUL-delimited chunks."""
    return [json.loads(p) for p in response.content.split(b"\0") if p.strip()]


def sse(response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(e) for e in lines[:-1]]


# --- SIGTERM drains the worker ------------------------------------------------------------------

def test_sigterm_drains_the_worker_then_cuts_off_what_outlives_the_grace_period(tmp_path):
    grace = 8.0
    worker = start_worker(None, tmp_path, args=["--stream-interval", "1", "--drain-timeout", str(grace)])
    short = {"prompt": "Once upon a time", "echo": False, "max_new_tokens": 12, "ignore_eos": True, "temperature": 0}
    long = {**short, "max_new_tokens": 100000}
    results, started = {}, {"short": threading.Event(), "long": threading.Event()}

    def stream(name, payload):
        seen = []
        with requests.post(worker.url + "/worker_generate_stream", json=payload, stream=True, timeout=TIMEOUT) as r:
            for piece in r.iter_lines(delimiter=b"\0"):
                if piece.strip():
                    seen.append(json.loads(piece))
                    started[name].set()
        results[name] = (seen, time.monotonic())

    threads = [threading.Thread(target=stream, args=("short", short)),
               threading.Thread(target=stream, args=("long", long))]
    try:
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started.values()), "the streams did not start"
        sent = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Draining: new work is refused clearly, and the controller would drop the worker.
        r = requests.post(worker.url + "/worker_generate_stream", json=short, timeout=30)
        assert r.status_code == 503 and "shutting down" in r.json()["text"], r.text
        assert requests.get(worker.url + "/health", timeout=30).json()["status"] == "draining"
        assert requests.post(worker.url + "/worker_get_status", timeout=30).status_code == 503
        for t in threads:
            t.join(grace + 30)
        seen, _ = results["short"]  # finished within the grace period: complete
        assert seen[-1]["error_code"] == 0 and seen[-1]["finish_reason"] == "length", seen[-1]
        assert seen[-1]["usage"]["completion_tokens"] == 12
        seen, ended = results["long"]  # still running when the grace period ended: a clear error
        assert seen[-1]["error_code"] != 0 and "--drain-timeout" in seen[-1]["text"], seen[-1]
        assert grace - 0.5 <= ended - sent <= grace + 10
        # Then it exits on its own; uvicorn re-raises the signal it handled once it has shut down.
        assert worker.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        worker.stop()
        for t in threads:
            t.join(5)


# --- who may call -------------------------------------------------------------------------------

def preflight(url: str, origin: str) -> requests.Response:
    return requests.options(url + "/v1/chat/completions", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})


def test_cors_is_off_by_default_and_allows_only_the_listed_origins(stack):
    api, cors = stack["api"].url, stack["cors"].url
    assert "access-control-allow-origin" not in preflight(api, ORIGIN).headers
    r = requests.post(api + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={"Origin": ORIGIN},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    r = preflight(cors, ORIGIN)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = requests.post(cors + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={"Origin": ORIGIN},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN

    other = "http://b.example"
    assert "access-control-allow-origin" not in preflight(cors, other).headers
    r = requests.post(cors + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={"Origin": other},
                      timeout=TIMEOUT)
    assert "access-control-allow-origin" not in r.headers


def test_a_cross_origin_text_plain_post_is_refused(stack):
    # What a web page may send anywhere without a preflight: a "simple" request with a text/plain body.
    simple = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    for url in (stack["api"].url + "/v1/chat/completions", stack["cors"].url + "/v1/chat/completions",
                stack["api"].url + "/v1/completions"):
        r = requests.post(url, data=json.dumps({**CHAT, "prompt": "hi"}), headers=simple, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["message"], (url, r.text)
    for route in ("/worker_generate_stream", "/worker_generate", "/count_token"):
        r = requests.post(stack["worker"].url + route, data=json.dumps({"prompt": "hi"}), headers=simple, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["text"], (route, r.text)


# --- honest 503s --------------------------------------------------------------------------------

def test_models_and_health_are_503_with_a_message_when_nothing_serves(tmp_path):
    ctl = start_controller(tmp_path)
    api = start_openai_server(ctl.url, tmp_path, ours=True)
    try:
        # No worker at all, then one registered that nothing answers at (a dead machine).
        r = requests.get(api.url + "/health", timeout=30)
        assert r.status_code == 503 and "no model worker" in r.json()["message"], r.text
        dead = f"http://127.0.0.1:{free_port()}"
        http_json(ctl.url + "/register_worker", {"worker_name": dead, "check_heart_beat": False,
                                                 "worker_status": {"model_names": ["ghost"], "speed": 1,
                                                                   "queue_length": 0}})
        r = requests.get(api.url + "/health", timeout=30)
        assert r.status_code == 503 and "no model worker" in r.json()["message"], r.text
        assert requests.get(api.url + "/v1/models", timeout=30).json()["data"] == []

        ctl.stop()  # the controller is down
        for path in ("/v1/models", "/v1/models/ghost", "/health"):
            r = requests.get(api.url + path, timeout=30)
            assert r.status_code == 503 and "controller" in r.json()["message"], (path, r.text)
        r = requests.post(api.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503 and "cannot be reached" in r.json()["message"], r.text
    finally:
        stop_all([api, ctl])


# --- n, seed, logprobs through the OpenAI API (OpenAI's JSON; the `openai` SDK is not installed) --

def test_n_gives_n_choices(stack):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {"model": MODEL, "prompt": "Hello"})):
        r = requests.post(stack["api"].url + path, json={**body, "n": 3, "max_tokens": 3, "temperature": 1,
                                                          "ignore_eos": True}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        assert all(c["finish_reason"] == "length" for c in answer["choices"])
        assert answer["usage"]["completion_tokens"] == 9  # three samples of three tokens


def test_the_same_seed_gives_the_same_sample(stack):
    body = {**CHAT, "messages": [{"role": "user", "content": "Write a word."}], "temperature": 1, "max_tokens": 8}
    texts = [requests.post(stack["api"].url + "/v1/chat/completions", json={**body, "seed": seed},
                           timeout=TIMEOUT).json()["choices"][0]["message"]["content"] for seed in (11, 11, 12, 13)]
    assert texts[0] == texts[1] and texts[0]
    assert len(set(texts)) > 1, texts  # three different seeds all agreeing would mean the seed is ignored


def test_chat_logprobs_with_top_alternatives(stack):
    r = requests.post(stack["api"].url + "/v1/chat/completions", timeout=TIMEOUT,
                      json={**CHAT, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] > 0
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 3 and entry["logprob"] <= 0
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the chosen token is the most likely one
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)
        assert entry["bytes"] == list(entry["token"].encode())
    # Without logprobs the field is null.
    assert requests.post(stack["api"].url + "/v1/chat/completions", json=CHAT,
                         timeout=TIMEOUT).json()["choices"][0]["logprobs"] is None


def test_streamed_chat_logprobs_add_up_to_the_whole(stack):
    body = {**CHAT, "logprobs": True, "top_logprobs": 2, "stream": True}
    with requests.post(stack["api"].url + "/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT) as r:
        events = sse(r)
    entries = [e for ev in events for c in ev["choices"] for e in ((c.get("logprobs") or {}).get("content") or [])]
    text = "".join(c["delta"].get("content", "") for ev in events for c in ev["choices"])
    assert entries and "".join(e["token"] for e in entries) == text
    assert all(len(e["top_logprobs"]) == 2 for e in entries)


def test_completion_logprobs(stack):
    r = requests.post(stack["api"].url + "/v1/completions", timeout=TIMEOUT,
                      json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                            "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(4)]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) == 2 and max(top.values()) == pytest.approx(value, abs=1e-5)
        assert token in top


# --- the package on its own ---------------------------------------------------------------------

TOP_LEVEL_SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))


def test_no_module_reaches_back_into_the_checkout():
    """No code in bayling/ names a top-level script or climbs out of the package (docstrings may explain)."""
    script = re.compile(r"\b(" + "|".join(map(re.escape, TOP_LEVEL_SCRIPTS)) + r")\b")
    found = []
    for path in sorted((ROOT / "bayling").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and script.search(node.value):
                found.append(f"{where} names {script.search(node.value).group()}")
            # parents[N] of a module's own path: N = 0 is its package, 1 the folder holding `bayling`; more
            # climbs into whatever holds that (a checkout, site-packages).
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "parents" and not (isinstance(node.slice, ast.Constant)
                                                              and node.slice.value in (0, 1)):
                found.append(f"{where} climbs out: {ast.unparse(node)}")
    assert TOP_LEVEL_SCRIPTS and not found, found


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package as `pip install` lays it out, in a folder outside the checkout (no dependencies)."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bayling", src / "bayling", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                    "--target", str(tmp / "site"), str(src)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)
    return tmp / "site"


def outside_env(site: Path) -> dict:
    """Only the installed copy of bayling importable (the checkout is not on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "GRADIO_ANALYTICS_ENABLED": "False"})
    return env


def test_the_installed_package_runs_outside_the_checkout(installed, tmp_path):
    env = outside_env(installed)
    where = subprocess.run([sys.executable, "-c", "import bayling, bayling.eval.data as d; "
                            "print(bayling.__file__); print(d.MANIFEST.is_file())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split() == [str(installed / "bayling" / "__init__.py"), "True"], where.stderr
    for module, words in (("bayling.serve", "--drain-timeout"), ("bayling.serve.web", "--controller-url"),
                          ("bayling.serve.worker", "--drain-timeout"), ("bayling.serve.openai_api", "--allowed-origins")):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and words in r.stdout, (module, r.stderr[-2000:])


# --- the launcher stops the worker by draining it ------------------------------------------------

def test_the_launcher_drains_an_in_flight_answer_when_stopped(installed, tmp_path):
    """`python -m bayling.serve` from the installed copy, in a folder outside the checkout, with the page:
    Ctrl-C while an answer streams through the OpenAI API lets it finish, then everything exits."""
    run = tmp_path / "run"
    run.mkdir()
    ports = [free_port() for _ in range(4)]
    args = ["--controller-port", str(ports[0]), "--worker-port", str(ports[1]), "--web-port", str(ports[2]),
            "--openai-api", "bayling", "--openai-port", str(ports[3]), "--log-dir", "logs", "--drain-timeout", "60",
            "--device", "cpu", "--stream-interval", "1"]
    with launched(args, cwd=run, env=outside_env(installed)) as stack:
        ours = [p for p in stack.children() if "bayling.serve." in " ".join(p.cmdline())]
        assert {next(a for a in p.cmdline() if a.startswith("bayling.")) for p in ours} == \
            {"bayling.serve.worker", "bayling.serve.openai_api", "bayling.serve.web"}
        for p in ours:  # run from the launcher's folder, importing the installed copy first
            assert p.cwd() == str(run) and p.environ()["PYTHONPATH"].split(os.pathsep)[0] == str(installed)
        assert (run / "logs" / "model_worker.log").is_file()

        api, worker = f"http://127.0.0.1:{ports[3]}", f"http://127.0.0.1:{ports[1]}"
        tokens = 64  # a few seconds here: still running while the new request below is refused
        body = {**CHAT, "max_tokens": tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with requests.post(api + "/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT) as r:
            lines = r.iter_lines(decode_unicode=True)
            events = []
            for line in lines:  # the first tokens have come: the answer is in flight
                if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                    events.append(json.loads(line[6:]))
                    break
            stack.proc.send_signal(signal.SIGINT)  # Ctrl-C
            deadline = time.monotonic() + 10
            while requests.get(worker + "/health", timeout=10).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            # The worker drains while the API is still up: a new request is a clear 503, not a 404.
            refused = requests.post(api + "/v1/chat/completions", json=CHAT, timeout=30)
            assert refused.status_code == 503 and "shutting down" in refused.json()["message"], refused.text
            events += [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
        assert not any("error" in e for e in events), events[-1]
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finish == ["length"] and events[-1]["usage"]["completion_tokens"] == tokens, events[-2:]
        assert stack.proc.wait(60) == 0
        gone, alive = psutil.wait_procs(list(stack.seen), timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        assert "draining" in (run / "logs" / "model_worker.log").read_text()
