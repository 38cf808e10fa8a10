"""The soak under faults (issue 9), run by `bench/serve.py --soak`: the whole stack from the launcher
(`python -m bayling.serve`, which restarts a dead worker), driven through our OpenAI API.

N chat completions at a fixed concurrency: plain and streamed alike, 10% of clients leaving early
(a stream closed after its first token, or a plain request given up after a short read timeout),
5% malformed requests, and one SIGKILL of the model worker mid-run. From the kill until the API's
/health is 200 again (the restarted worker registered) new requests are held back, as a load
balancer's health check would; the requests in flight at the kill may fail, with a clear error.
Every request has a client timeout: one that runs past it is a hang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import psutil
import requests

from bayling.serve.launch import HOST, free_port, wait_http

MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["bees", "volcanoes", "tea", "bicycles", "the moon", "rivers", "owls", "bread", "glaciers", "maps",
          "the silk road", "printing", "vaccines", "ocean currents", "roman roads", "flight"]
LEAVE_TOKENS = 256  # a leaving client asks for many tokens, so its abort is what frees the slot
LEAVE_READ_TIMEOUT_S = 1.0  # a plain request that leaves gives up after this long without an answer
# Malformed bodies (raw bytes): each must be a 4xx with a message, before any stream byte.
MALFORMED = [
    b'{"model": "' + MODEL.encode() + b'", "messages": [',
    json.dumps({"model": MODEL, "messages": "hello"}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}',
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": True}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": -5}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(),
]


def kind_of(i: int) -> str:
    """5% malformed, 10% leaving early (half streamed), the rest half plain, half streamed."""
    if i % 20 == 7:
        return "malformed"
    if i % 10 == 3:
        return "leave_stream" if i % 20 == 3 else "leave_plain"
    return "stream" if i % 2 else "plain"


@dataclass
class Outcome:
    i: int
    kind: str
    outcome: str = "broken"  # ok | error (clear, with a message) | refused (4xx) | left | broken | hung
    status: Optional[int] = None
    detail: str = ""
    start: float = 0.0
    end: float = 0.0


def _read_stream(r: requests.Response, leave: bool) -> tuple[str, Optional[str], Optional[str], bool]:
    """(text, finish_reason, error message, saw [DONE]) of an SSE answer; `leave` stops at the first token."""
    text, finish, error = "", None, None
    for line in r.iter_lines(decode_unicode=True):
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return text, finish, error, True
        event = json.loads(line[6:])
        if "error" in event:
            error = event["error"].get("message") or "?"
            continue
        choice = event["choices"][0]
        text += choice["delta"].get("content") or ""
        finish = choice["finish_reason"] or finish
        if leave and text:
            break
    return text, finish, error, False


def one(api: str, i: int, max_tokens: int, timeout_s: float) -> Outcome:
    """Send request i (its kind from kind_of) and classify what came back."""
    kind = kind_of(i)
    out = Outcome(i, kind, start=time.monotonic())
    headers = {"Content-Type": "application/json"}
    try:
        if kind == "malformed":
            r = requests.post(api + "/v1/chat/completions", data=MALFORMED[i % len(MALFORMED)], headers=headers,
                              timeout=timeout_s)
            out.status = r.status_code
            message = r.json().get("message") if r.headers.get("content-type", "").startswith("application/json") \
                else None
            out.outcome = "refused" if 400 <= r.status_code < 500 and message else "broken"
            out.detail = message or r.text[:200]
            return out
        stream = kind in ("stream", "leave_stream")
        leave = kind.startswith("leave")
        body = {"model": MODEL, "temperature": 0.7, "stream": stream,
                "max_tokens": LEAVE_TOKENS if leave else max_tokens,
                "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]}
        read_timeout = LEAVE_READ_TIMEOUT_S if kind == "leave_plain" else timeout_s
        try:
            r = requests.post(api + "/v1/chat/completions", json=body, stream=stream, timeout=(10, read_timeout))
        except requests.ReadTimeout:
            if kind == "leave_plain":
                out.outcome = "left"
                return out
            raise
        out.status = r.status_code
        if r.status_code != 200:  # refused before any byte: must say why
            d = r.json()
            out.outcome, out.detail = ("error" if d.get("message") else "broken"), d.get("message") or r.text[:200]
            return out
        if not stream:
            c = r.json()["choices"][0]
            good = bool(c["message"]["content"]) and c["finish_reason"] in ("stop", "length")
            out.outcome, out.detail = ("ok" if good else "broken"), json.dumps(c)[:200]
            return out
        deadline = out.start + timeout_s
        text, finish, error, done = _read_stream(r, leave)
        r.close()
        if time.monotonic() > deadline:
            out.outcome = "hung"
        elif error:
            out.outcome, out.detail = "error", error
        elif leave and text and not done:
            out.outcome = "left"
        else:
            good = done and bool(text) and finish in ("stop", "length")
            out.outcome, out.detail = ("ok" if good else "broken"), f"{text!r} {finish} {done}"
        return out
    except requests.Timeout as e:
        out.outcome, out.detail = "hung", str(e)[:200]
        return out
    except Exception as e:
        out.detail = f"{type(e).__name__}: {e}"[:300]
        return out
    finally:
        out.end = time.monotonic()


@dataclass
class Stack:
    """The launcher and the URLs of what it started."""

    proc: subprocess.Popen
    log: Path
    api: str
    worker: str

    def worker_process(self) -> psutil.Process:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if "bayling.serve.worker" in " ".join(p.cmdline()):
                return p
        raise RuntimeError(f"the launcher runs no model worker; see {self.log}")

    def wait_log(self, text: str, count: int = 1, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the launcher never printed {text!r}; see {self.log}")
            time.sleep(0.2)

    def batching(self) -> dict:
        return requests.post(self.worker + "/worker_get_status", timeout=10).json()["batching"]


def launch(work: Path, concurrency: int, env: dict) -> Stack:
    """`python -m bayling.serve` with our OpenAI API, no web page, the demo model on the CPU."""
    ports = [free_port() for _ in range(3)]
    log = work / "launcher.log"
    cmd = [sys.executable, "-m", "bayling.serve", "--controller-port", str(ports[0]), "--worker-port", str(ports[1]),
           "--openai-api", "bayling", "--openai-port", str(ports[2]), "--no-web", "--log-dir", str(work / "logs"),
           "--device", "cpu", "--limit-worker-concurrency", str(concurrency)]
    root = Path(__file__).resolve().parents[1]
    full_env = {**os.environ, "PYTHONPATH": str(root), "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "2", **env}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    stack = Stack(proc, log, f"http://{HOST}:{ports[2]}", f"http://{HOST}:{ports[1]}")
    stack.wait_log("Ctrl-C")
    return stack


def soak(stack: Stack, n: int, concurrency: int, max_tokens: int, kill_at: int, timeout_s: float) -> dict:
    """Run the soak against a started stack; return the counts, the RSS readings and the checks."""
    lock = threading.Lock()
    resume = threading.Event()
    resume.set()
    outcomes: list[Outcome] = []
    in_flight: dict[int, float] = {}
    state: dict = {"next": 0, "done": 0, "rss": {}, "kill": None}
    worker = stack.worker_process()

    def rss_at(label: str) -> None:
        with open(f"/proc/{worker.pid}/statm") as f:  # resident pages, cheaper than psutil under the lock
            state["rss"][label] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def client() -> None:
        while True:
            resume.wait()
            with lock:
                if not resume.is_set():  # the kill came between the wait and the lock
                    continue
                i = state["next"]
                if i >= n:
                    return
                state["next"] += 1
                in_flight[i] = time.monotonic()
            out = one(stack.api, i, max_tokens, timeout_s)
            with lock:
                del in_flight[i]
                outcomes.append(out)
                state["done"] += 1
                done = state["done"]
                if done == 50:
                    rss_at("first_worker_at_50")
                if state["kill"] and done == state["kill"]["done"] + 50:
                    rss_at("restarted_worker_at_50_after_restart")

    def killer() -> None:
        nonlocal worker
        while state["done"] < kill_at:
            time.sleep(0.05)
        with lock:
            resume.clear()  # hold new requests back until the API is healthy again
            rss_at("first_worker_before_kill")
            victim = set(in_flight)
            os.kill(worker.pid, signal.SIGKILL)
            state["kill"] = {"done": state["done"], "at": time.monotonic(), "in_flight": sorted(victim)}
        stack.wait_log("(restarted)")
        while True:
            try:
                if requests.get(stack.api + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        with lock:
            worker = stack.worker_process()
            state["kill"]["restart_s"] = round(time.monotonic() - state["kill"]["at"], 1)
            state["kill"]["status_after_restart"] = stack.batching()
        resume.set()

    start = time.monotonic()
    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    kill_thread.join(1)
    with lock:
        rss_at("restarted_worker_at_end")
    time.sleep(2)  # the last aborts reach the engine at its next step
    final = stack.batching()
    return summarize(outcomes, state, final, wall, n, concurrency, max_tokens, timeout_s)


def summarize(outcomes: list[Outcome], state: dict, final: dict, wall: float, n: int, concurrency: int,
              max_tokens: int, timeout_s: float) -> dict:
    """Counts by kind and outcome, and each check the issue asks for, with its reading."""
    kill = state["kill"] or {}
    at_kill = set(kill.get("in_flight", ()))
    counts: dict = {}
    for o in outcomes:
        counts.setdefault(o.kind, {}).setdefault(o.outcome, 0)
        counts[o.kind][o.outcome] += 1
    well_formed = [o for o in outcomes if o.kind != "malformed"]
    failed_outside_kill = [o for o in well_formed if o.outcome not in ("ok", "left") and o.i not in at_kill]
    unclear_at_kill = [o for o in well_formed if o.i in at_kill and o.outcome not in ("ok", "left", "error")]
    malformed_bad = [o for o in outcomes if o.kind == "malformed" and o.outcome != "refused"]
    hung = [o for o in outcomes if o.outcome == "hung"]
    rss = state["rss"]
    growth_first = _growth(rss.get("first_worker_at_50"), rss.get("first_worker_before_kill"))
    growth_restarted = _growth(rss.get("restarted_worker_at_50_after_restart"), rss.get("restarted_worker_at_end"))
    restarted_left = sum(1 for o in outcomes if o.outcome == "left" and kill and o.start > kill["at"])
    before = kill.get("status_after_restart", {})
    aborted_after_restart = final.get("aborted", 0) - before.get("aborted", 0)
    slots_free = final.get("running") == 0 and final.get("waiting") == 0 and final.get("kv_tokens_in_use") == 0
    checks = {
        "well_formed_complete_or_in_flight_at_kill": {
            "target": "every well-formed request completes (or left, as its client chose), except those in "
                      "flight at the kill", "measured": len(failed_outside_kill), "met": not failed_outside_kill},
        "in_flight_at_kill_clear_error": {"target": "each completes or gets an error with a message",
                                          "measured": len(unclear_at_kill), "met": not unclear_at_kill},
        "malformed_refused_with_message": {"target": "4xx with a message", "measured": len(malformed_bad),
                                           "met": not malformed_bad},
        "no_hang": {"target": f"none past the {timeout_s:.0f} s client timeout", "measured": len(hung),
                    "met": not hung},
        "rss_growth_first_worker": {"target": "< 10% from request 50 to the kill", "measured": growth_first,
                                    "met": growth_first is not None and growth_first < 0.10},
        "rss_growth_restarted_worker": {"target": "< 10% from 50 requests after its restart to the end",
                                        "measured": growth_restarted,
                                        "met": growth_restarted is not None and growth_restarted < 0.10},
        "aborted_free_their_slots": {
            "target": "restarted worker: aborted counter >= clients that left after the restart, and at the "
                      "end nothing running, waiting or holding KV",
            "measured": {"left_after_restart": restarted_left, "aborted": aborted_after_restart,
                         "running": final.get("running"), "waiting": final.get("waiting"),
                         "kv_tokens_in_use": final.get("kv_tokens_in_use")},
            "met": slots_free and aborted_after_restart >= restarted_left > 0},
    }
    errors = [asdict(o) for o in well_formed if o.outcome == "error"][:5]
    mib = {k: round(v / 2**20, 1) for k, v in rss.items()}
    return {"requests": n, "concurrency": concurrency, "max_tokens": max_tokens,
            "leaving_clients_max_tokens": LEAVE_TOKENS, "client_timeout_s": timeout_s, "wall_s": round(wall, 1),
            "outcomes_by_kind": counts,
            "kill": {"after_requests_done": kill.get("done"), "in_flight": len(at_kill),
                     "restart_s": kill.get("restart_s"),
                     "in_flight_outcomes": dict(Counter(o.outcome for o in outcomes if o.i in at_kill))},
            "error_samples": errors, "failures_outside_kill": [asdict(o) for o in failed_outside_kill][:5],
            "worker_rss_mib": mib, "restarted_worker_status_at_end": final, "checks": checks,
            "all_met": all(c["met"] for c in checks.values())}


def _growth(first: Optional[int], last: Optional[int]) -> Optional[float]:
    return round((last - first) / first, 4) if first and last else None


def stop(stack: Stack) -> None:
    """SIGINT the launcher (it stops its children), SIGKILL its group if it lingers."""
    if stack.proc.poll() is None:
        os.killpg(stack.proc.pid, signal.SIGINT)
        try:
            stack.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(stack.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    stack.proc.wait()


def run(work: Path, n: int, concurrency: int, max_tokens: int, kill_at: int, timeout_s: float, env: dict) -> dict:
    """Launch, warm up, soak, stop."""
    stack = launch(work, concurrency, env)
    try:
        wait_http(stack.api + "/health", 60, "GET")
        one(stack.api, 1, 4, timeout_s)  # warm up
        return soak(stack, n, concurrency, max_tokens, kill_at, timeout_s)
    finally:
        stop(stack)
