"""Real serving processes on 127.0.0.1 for tests: FastChat's controller, our worker, an OpenAI server.

    ctl = start_controller(tmp_path)
    worker = start_worker(ctl.url, tmp_path)           # waits until the controller lists its model
                                                        # (backend="llama.cpp": the demo GGUF on llama.cpp)
    api = start_openai_server(ctl.url, tmp_path)        # FastChat's; ours=True for bayling.serve.openai_api
    ...
    stop_all([api, worker, ctl])                        # always, e.g. in a fixture's finally

    with running() as started:                          # or: stopped, last first, when the block ends
        ctl = started.add(start_controller(tmp_path))

    with launched(["--no-web", ...], cwd=folder) as stack:   # `python -m bayling.serve`, up
        stack.children()                                # its processes (all killed when the block ends)

Every process runs in its own session (process group) and logs to log_dir/NAME.log; Service.stop()
sends SIGINT, then SIGKILL to the group after a grace period, so nothing outlives a test. The process
plumbing (Service, free_port, wait_http, start_process, stop_all) is bayling.serve.launch's, which
`python -m bayling.serve` uses too.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import psutil

from bayling.serve.launch import HOST, Service, default_sigint, ensure_started, free_port, start_process, stop_all, \
    wait_http

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its top-level scripts (model_worker.py...)

__all__ = ["HOST", "ROOT", "Service", "free_port", "wait_http", "http_json", "start_controller", "start_worker",
           "start_openai_server", "wait_registered", "stop_all", "running", "launched"]

OFFLINE = {"HF_HUB_OFFLINE": "1"}
# One torch thread per model process: on a shared 2-core machine, two OpenMP threads per process are
# several times slower than one as soon as anything else runs (measured: 2.5 vs 8 tokens/s).
WORKER_THREADS = 1


def http_json(url: str, payload: Optional[dict] = None, method: str = "POST", timeout: float = 10.0) -> object:
    """POST (or GET) JSON and return the decoded reply."""
    data = json.dumps(payload).encode() if payload is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def start_controller(log_dir: Path, port: Optional[int] = None, *, heart_beat_expiration: Optional[int] = None,
                     timeout: float = 60.0) -> Service:
    """FastChat's controller (`python -m fastchat.serve.controller`), unchanged.

    heart_beat_expiration (seconds) sets FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION: how soon it drops
    a worker that stopped sending heart beats (FastChat's default is 90 s).
    """
    port = port or free_port()
    env = dict(OFFLINE)
    if heart_beat_expiration:
        env["FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"] = str(heart_beat_expiration)
    svc = start_process(f"controller-{port}", ["-m", "fastchat.serve.controller", "--host", HOST, "--port", str(port)],
                        log_dir, f"http://{HOST}:{port}", env=env, stop_grace=1.0)
    return ensure_started(svc, "/test_connection", timeout)


def start_worker(controller_url: Optional[str], log_dir: Path, port: Optional[int] = None, *,
                 model_path: Optional[str] = None, args: Iterable[str] = (), heart_beat_interval: Optional[int] = None,
                 script: bool = True, threads: Optional[int] = WORKER_THREADS, backend: str = "torch",
                 timeout: float = 180.0) -> Service:
    """Our worker (`python model_worker.py`, the demo model on the CPU unless model_path is given).

    Waits until it answers /worker_get_status and, when controller_url is given, until the
    controller lists its model; controller_url=None starts it with --no-register.
    heart_beat_interval sets FASTCHAT_WORKER_HEART_BEAT_INTERVAL (seconds). script=False runs
    `python -m bayling.serve.worker` instead of the top-level script. threads sets OMP_NUM_THREADS
    (None: torch's default). backend is always passed as --backend (never left to what auto means).
    """
    port = port or free_port()
    cmd = [str(ROOT / "model_worker.py")] if script else ["-m", "bayling.serve.worker"]
    cmd += ["--host", HOST, "--port", str(port), "--device", "cpu", "--backend", backend]
    cmd += ["--controller-address", controller_url] if controller_url else ["--no-register"]
    if model_path:
        cmd += ["--model-path", str(model_path)]
    cmd += list(args)
    env = dict(OFFLINE)
    if heart_beat_interval:
        env["FASTCHAT_WORKER_HEART_BEAT_INTERVAL"] = str(heart_beat_interval)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    svc = start_process(f"worker-{port}", cmd, log_dir, f"http://{HOST}:{port}", env=env)
    ensure_started(svc, "/worker_get_status", timeout, "POST")
    if controller_url:
        try:
            wait_registered(controller_url, svc.url)
        except Exception:
            svc.stop()
            raise
    return svc


def wait_registered(controller_url: str, worker_url: str, timeout: float = 30.0) -> list[str]:
    """Wait until the controller lists the worker's models; returns them."""
    names = http_json(worker_url + "/worker_get_status")["model_names"]
    deadline = time.monotonic() + timeout
    while True:
        models = http_json(controller_url + "/list_models")["models"]
        if all(n in models for n in names):
            return names
        if time.monotonic() > deadline:
            raise RuntimeError(f"the controller at {controller_url} never listed {names} (it lists {models})")
        time.sleep(0.2)


def start_openai_server(controller_url: str, log_dir: Path, port: Optional[int] = None, *, ours: bool = False,
                        args: Iterable[str] = (), timeout: float = 60.0) -> Service:
    """An OpenAI-compatible server: FastChat's (`fastchat.serve.openai_api_server`) or ours (ours=True)."""
    port = port or free_port()
    module = "bayling.serve.openai_api" if ours else "fastchat.serve.openai_api_server"
    svc = start_process(f"openai-{'ours' if ours else 'fastchat'}-{port}",
                        ["-m", module, "--host", HOST, "--port", str(port), "--controller-address", controller_url,
                         *args],
                        log_dir, f"http://{HOST}:{port}", env=OFFLINE)
    return ensure_started(svc, "/metrics" if ours else "/v1/models", timeout)


class Started(list):
    """Services started so far, stopped last first by `running`."""

    def add(self, service: Service) -> Service:
        self.append(service)
        return service


@contextlib.contextmanager
def running() -> Iterator[Started]:
    """A list to add started services to; every one is stopped, last first, when the block ends."""
    started = Started()
    try:
        yield started
    finally:
        stop_all(reversed(started))


class Launch:
    """A running `python -m bayling.serve`: its process, what it printed, and every child seen."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self.seen = proc, [], set()
        self.process = psutil.Process(proc.pid)

    def read_until(self, text: str) -> str:
        """Its output up to the first line that holds `text` (AssertionError with the output if it ends first)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the launcher never printed {text!r}:\n{''.join(self.lines)}")

    def children(self) -> list[psutil.Process]:
        """Its processes now (remembered, so that the block's end kills them even when it is gone)."""
        found = self.process.children(recursive=True)
        self.seen.update(found)
        return found

    def child(self, module: str) -> psutil.Process:
        """The child that runs `module`."""
        for p in self.children():
            if module in p.cmdline():
                return p
        raise AssertionError(f"no child runs {module}")


@contextlib.contextmanager
def launched(args: Sequence[str], cwd: Path = ROOT, env: Optional[dict] = None) -> Iterator[Launch]:
    """`python -m bayling.serve ARGS` (in cwd), once it says it is up; when the block ends it and every
    process it started are killed. env: the whole environment (default: this one, the checkout importable,
    offline, one torch thread a process)."""
    if env is None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **OFFLINE, "OMP_NUM_THREADS": str(WORKER_THREADS)}
    # preexec_fn: Ctrl-C's default action back, as a terminal gives it (a backgrounded CI shell starts
    # us with SIGINT ignored, and the launcher would inherit that and never see the test's Ctrl-C).
    proc = subprocess.Popen([sys.executable, "-m", "bayling.serve", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=default_sigint)
    launch = Launch(proc)
    try:
        launch.read_until("Ctrl-C")
        launch.children()
        yield launch
    finally:
        if proc.poll() is None:
            launch.children()
            proc.kill()
        proc.wait()
        for p in launch.seen:
            with contextlib.suppress(psutil.Error):
                p.kill()
