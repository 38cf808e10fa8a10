"""Real serving processes on 127.0.0.1 for tests: FastChat's controller, our worker, an OpenAI server.

    ctl = start_controller(tmp_path)
    worker = start_worker(ctl.url, tmp_path)           # waits until the controller lists its model
    api = start_openai_server(ctl.url, tmp_path)        # FastChat's; ours=True for bayling.serve.openai_api
    ...
    stop_all([api, worker, ctl])                        # always, e.g. in a fixture's finally

Every process runs in its own session (process group), logs to log_dir/NAME.log, and is stopped by
Service.stop(): SIGINT, then SIGKILL to the group after a grace period, so nothing outlives a test.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_json(url: str, payload: Optional[dict] = None, method: str = "POST", timeout: float = 10.0) -> object:
    """POST (or GET) JSON and return the decoded reply."""
    data = json.dumps(payload).encode() if payload is not None else b"" if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def wait_http(url: str, timeout: float = 60.0, method: str = "GET", proc: Optional[subprocess.Popen] = None) -> None:
    """Wait until url answers with a 2xx/4xx status (any HTTP reply means the server is up).

    Raises RuntimeError at once if proc exits first, TimeoutError after timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with code {proc.returncode} before {url} answered")
        try:
            req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
            with urllib.request.urlopen(req, timeout=2):
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


@dataclass
class Service:
    """A started process: its URL, its log, and how to stop it."""

    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    stop_grace: float = STOP_GRACE_S

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: Optional[float] = None) -> None:
        """SIGINT the process group, then SIGKILL whatever is left after `grace` seconds."""
        grace = self.stop_grace if grace is None else grace
        if self.proc.poll() is None:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGKILL)  # also children the process may have left behind
        self.proc.wait()

    def kill(self) -> None:
        """SIGKILL at once (a crashed worker, as the controller sees it)."""
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


def base_env(log_dir: Path, extra: Optional[dict] = None) -> dict:
    """The environment for a child: offline hub, FastChat's log files in log_dir, the repo importable."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LOGDIR": str(log_dir),
                "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


def start_process(name: str, args: Sequence[str], log_dir: Path, url: str, *, env: Optional[dict] = None,
                  cwd: Optional[Path] = None) -> Service:
    """Start `python args...` in its own session with stdout+stderr in log_dir/NAME.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(cwd or ROOT), env=base_env(log_dir, env),
                                start_new_session=True)
    return Service(name, proc, url, log_path)


def _started(service: Service, check: str, timeout: float, method: str) -> Service:
    try:
        wait_http(service.url + check, timeout, method, service.proc)
    except Exception as e:
        service.stop()
        raise RuntimeError(f"{service.name} did not start: {e}\n--- {service.log_path} ---\n{service.log()[-3000:]}")
    return service


def start_controller(log_dir: Path, port: Optional[int] = None, *, heart_beat_expiration: Optional[int] = None,
                     timeout: float = 60.0) -> Service:
    """FastChat's controller (`python -m fastchat.serve.controller`), unchanged.

    heart_beat_expiration (seconds) sets FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION: how soon it drops
    a worker that stopped sending heart beats (FastChat's default is 90 s).
    """
    port = port or free_port()
    env = {"FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": str(heart_beat_expiration)} if heart_beat_expiration else None
    svc = start_process(f"controller-{port}", ["-m", "fastchat.serve.controller", "--host", HOST, "--port", str(port)],
                        log_dir, f"http://{HOST}:{port}", env=env)
    svc.stop_grace = 1.0  # its heart-beat thread is not a daemon: it never exits on its own
    return _started(svc, "/test_connection", timeout, "GET")


def start_worker(controller_url: Optional[str], log_dir: Path, port: Optional[int] = None, *,
                 model_path: Optional[str] = None, args: Iterable[str] = (), heart_beat_interval: Optional[int] = None,
                 script: bool = True, timeout: float = 180.0) -> Service:
    """Our worker (`python model_worker.py`, demo model on the CPU unless model_path is given).

    Waits until it answers /worker_get_status and, when controller_url is given, until the
    controller lists its model. controller_url=None starts it with --no-register.
    heart_beat_interval sets FASTCHAT_WORKER_HEART_BEAT_INTERVAL (seconds).
    """
    port = port or free_port()
    cmd = [str(ROOT / "model_worker.py")] if script else ["-m", "bayling.serve.worker"]
    cmd += ["--host", HOST, "--port", str(port), "--device", "cpu"]
    cmd += ["--controller-address", controller_url] if controller_url else ["--no-register"]
    if model_path:
        cmd += ["--model-path", str(model_path)]
    cmd += list(args)
    env = {"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(heart_beat_interval)} if heart_beat_interval else None
    svc = _started(start_process(f"worker-{port}", cmd, log_dir, f"http://{HOST}:{port}", env=env),
                   "/worker_get_status", timeout, "POST")
    if controller_url:
        wait_registered(controller_url, svc.url, timeout=30.0, service=svc)
    return svc


def wait_registered(controller_url: str, worker_url: str, timeout: float = 30.0,
                    service: Optional[Service] = None) -> list[str]:
    """Wait until the controller lists the worker's models; returns them."""
    names = http_json(worker_url + "/worker_get_status")["model_names"]
    deadline = time.monotonic() + timeout
    while True:
        models = http_json(controller_url + "/list_models")["models"]
        if all(n in models for n in names):
            return names
        if time.monotonic() > deadline:
            if service is not None:
                service.stop()
            raise RuntimeError(f"the controller at {controller_url} never listed {names} (it lists {models})")
        time.sleep(0.2)


def start_openai_server(controller_url: str, log_dir: Path, port: Optional[int] = None, *, ours: bool = False,
                        timeout: float = 60.0) -> Service:
    """An OpenAI-compatible server: FastChat's (`fastchat.serve.openai_api_server`) or ours (ours=True)."""
    port = port or free_port()
    module = "bayling.serve.openai_api" if ours else "fastchat.serve.openai_api_server"
    svc = start_process(f"openai-{'ours' if ours else 'fastchat'}-{port}",
                        ["-m", module, "--host", HOST, "--port", str(port), "--controller-address", controller_url],
                        log_dir, f"http://{HOST}:{port}")
    return _started(svc, "/v1/models", timeout, "GET")


def stop_all(services: Iterable[Optional[Service]]) -> None:
    """Stop every service given (None entries are skipped), even if one of them fails to stop."""
    errors = []
    for svc in services:
        if svc is None:
            continue
        try:
            svc.stop()
        except Exception as e:  # keep stopping the rest
            errors.append(f"{svc.name}: {e}")
    if errors:
        raise RuntimeError("; ".join(errors))
