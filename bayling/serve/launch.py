"""Starting, health-checking and stopping the serving processes (used by `python -m bayling.serve` and tests).

Each child runs in its own session (process group), so a Ctrl-C in the terminal reaches only the
launcher, which then stops the children: the model worker first, with SIGTERM, so that it drains
(in-flight answers finish, for up to its --drain-timeout, while the API and the page still relay them),
then the others in reverse start order with SIGINT. Whatever is left after its grace period gets
SIGKILL to the whole group (FastChat's controller never exits on its own: its heart-beat thread is not
a daemon).

Nothing here reaches back into a checkout: children run `python -m bayling...` from the launcher's
own working directory, with the folder that holds this `bayling` package first on PYTHONPATH.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import bayling

from .supervise import DEFAULT_DRAIN_S, PARENT_ENV, RestartBudget, child_preexec

# The folder that holds the `bayling` package: a checkout's root or site-packages alike.
PACKAGE_PARENT = Path(bayling.__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_GRACE_S = 5.0
# A draining worker, after its drain period, flushes its error chunks and gives uvicorn a few seconds
# to close connections (bayling.serve.worker_app: FLUSH_S, SHUTDOWN_GRACE_S): SIGKILL only after that.
DRAIN_MARGIN_S = 10.0
POLL_S = 0.2


def free_port(host: str = HOST) -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def default_sigint() -> None:
    """In a child before exec: Ctrl-C's default action back, so our SIGINT stops it.

    A launcher started in the background by a non-interactive shell (nohup, CI) inherits SIGINT
    ignored, and so would every child; Python then never raises KeyboardInterrupt.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_http(url: str, timeout: float = 60.0, method: str = "GET", proc: Optional[subprocess.Popen] = None) -> None:
    """Wait until url gives any HTTP reply below 500 (the server is up).

    Raises RuntimeError at once if proc exits first, TimeoutError after timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"it exited with code {proc.returncode} before {url} answered")
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
        time.sleep(POLL_S)


@dataclass
class Service:
    """A started child process: its URL, its log file, and how to stop it."""

    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    stop_grace: float = STOP_GRACE_S
    stop_signal: int = signal.SIGINT  # SIGTERM for the worker: it drains

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: Optional[float] = None) -> None:
        """Send stop_signal to the process group, then SIGKILL whatever is left after `grace` seconds."""
        grace = self.stop_grace if grace is None else grace
        if self.proc.poll() is None:
            _killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.proc.pid, signal.SIGKILL)  # also whatever the child left behind in its group
        self.proc.wait()

    def kill(self) -> None:
        """SIGKILL at once (a crash, as the others see it)."""
        _killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def child_env(log_dir: Path, extra: Optional[dict] = None) -> dict:
    """A child's environment: FastChat's log files in log_dir, this `bayling` package importable first,
    unbuffered output, and the launcher's pid (our children exit when it is gone:
    bayling.serve.supervise.watch_parent)."""
    env = dict(os.environ)
    env.update({"LOGDIR": str(log_dir), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                PARENT_ENV: str(os.getpid())})
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in paths if p != str(PACKAGE_PARENT)])
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def start_process(name: str, args: Sequence[str], log_dir: Path, url: str, *, env: Optional[dict] = None,
                  cwd: Optional[Path] = None, stop_grace: float = STOP_GRACE_S,
                  stop_signal: int = signal.SIGINT) -> Service:
    """Start `python args...` in its own session (in cwd, default the launcher's), output to log_dir/NAME.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=child_env(log_dir, env),
                                start_new_session=True, preexec_fn=child_preexec(os.getpid()))
    return Service(name, proc, url, log_path, stop_grace, stop_signal)


def ensure_started(service: Service, path: str, timeout: float, method: str = "GET") -> Service:
    """Wait for service.url + path; on failure stop it and raise with the end of its log."""
    try:
        wait_http(service.url + path, timeout, method, service.proc)
    except Exception as e:
        service.stop()
        tail = service.log()[-3000:]
        raise RuntimeError(f"{service.name} did not start: {e}\n--- end of {service.log_path} ---\n{tail}") from None
    return service


def stop_stack(services: Sequence[Service]) -> None:
    """Stop a started stack: whatever drains on SIGTERM (the worker) first, while the API and the page
    still relay its last answers, then the rest in reverse start order."""
    draining = [s for s in services if s.stop_signal == signal.SIGTERM]
    stop_all([*draining, *reversed([s for s in services if s not in draining])])


def stop_all(services: Iterable[Optional[Service]]) -> None:
    """Stop every service (None entries skipped), carrying on past any that fails to stop."""
    errors = []
    for svc in services:
        if svc is None:
            continue
        try:
            svc.stop()
        except Exception as e:
            errors.append(f"{svc.name}: {e}")
    if errors:
        raise RuntimeError("; ".join(errors))


# --- the whole stack -------------------------------------------------------------------------

@dataclass
class StackPlan:
    """What `python -m bayling.serve` starts."""

    host: str = HOST
    controller_port: int = 21001
    worker_port: int = 21002
    web_port: int = 7860
    openai_port: int = 8000
    openai_api: Optional[str] = None  # None, "fastchat" or "bayling"
    worker_args: list[str] = field(default_factory=list)  # model and worker flags, passed through
    log_dir: Path = Path("logs")
    web: bool = True
    worker_timeout: float = 900.0  # a first start may convert the demo model or load a 13B model
    api_key: Optional[str] = None  # for the OpenAI API
    allowed_origins: Optional[str] = None  # for the OpenAI API (CORS)
    auth: Optional[str] = None  # USER:PASS for the web page
    restarts_per_minute: int = 5  # of a dead worker
    drain_s: float = DEFAULT_DRAIN_S  # the worker's --drain-timeout: how long stopping may wait on answers


# Each starter appends its service to `started` before waiting on it, so a Ctrl-C during a long
# start (a model loading) still stops it.
def _controller(plan: StackPlan, started: list[Service]) -> Service:
    url = f"http://{plan.host}:{plan.controller_port}"
    svc = start_process("controller", ["-m", "fastchat.serve.controller", "--host", plan.host,
                                       "--port", str(plan.controller_port)], plan.log_dir, url, stop_grace=1.0)
    started.append(svc)
    return ensure_started(svc, "/test_connection", 60)


def _worker(plan: StackPlan, controller: str, started: list[Service]) -> Service:
    url = f"http://{plan.host}:{plan.worker_port}"
    svc = start_process("model_worker", ["-m", "bayling.serve.worker", "--host", plan.host,
                                         "--port", str(plan.worker_port), "--controller-address", controller,
                                         "--drain-timeout", str(plan.drain_s), *plan.worker_args],
                        plan.log_dir, url, stop_grace=plan.drain_s + DRAIN_MARGIN_S, stop_signal=signal.SIGTERM)
    started.append(svc)
    ensure_started(svc, "/worker_get_status", plan.worker_timeout, "POST")
    _wait_listed(controller, svc)
    return svc


def _wait_listed(controller: str, worker: Service, timeout: float = 30.0) -> None:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(urllib.request.Request(controller + "/list_models", data=b""), timeout=5) as r:
            if json.loads(r.read())["models"]:
                return
        time.sleep(POLL_S)
    worker.stop()
    raise RuntimeError(f"the worker did not register with the controller at {controller}; see {worker.log_path}")


def _web(plan: StackPlan, controller: str, started: list[Service]) -> Service:
    url = f"http://{plan.host}:{plan.web_port}"
    args = ["-m", "bayling.serve.web", "--host", plan.host, "--port", str(plan.web_port),
            "--controller-url", controller, "--log-dir", str(plan.log_dir)]
    args += ["--auth", plan.auth] if plan.auth else []
    svc = start_process("web_server", args, plan.log_dir, url)
    started.append(svc)
    return ensure_started(svc, "/", 180)


def _openai(plan: StackPlan, controller: str, started: list[Service]) -> Service:
    module = "bayling.serve.openai_api" if plan.openai_api == "bayling" else "fastchat.serve.openai_api_server"
    url = f"http://{plan.host}:{plan.openai_port}"
    args = ["-m", module, "--host", plan.host, "--port", str(plan.openai_port), "--controller-address", controller]
    if plan.openai_api == "bayling":
        args += ["--allowed-origins", plan.allowed_origins] if plan.allowed_origins else []
    env = {"BAYLING_API_KEY": plan.api_key} if plan.api_key else None  # not on the command line: ps shows it
    if plan.api_key and plan.openai_api != "bayling":
        args += ["--api-keys", plan.api_key]  # FastChat's server's flag
        env = None
    svc = start_process("openai_api", args, plan.log_dir, url, env=env)
    started.append(svc)
    return ensure_started(svc, "/metrics" if plan.openai_api == "bayling" else "/v1/models", 60)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the same way Ctrl-C does


def run_stack(plan: StackPlan) -> int:
    """Start everything, print the URLs, and stop it all on Ctrl-C or when any part dies."""
    ports = [("controller", plan.controller_port), ("worker", plan.worker_port)]
    ports += [("web page", plan.web_port)] if plan.web else []
    ports += [("OpenAI API", plan.openai_port)] if plan.openai_api else []
    busy = [f"{what} port {port}" for what, port in ports if port_in_use(port, plan.host)]
    if busy:
        print(f"error: already in use: {', '.join(busy)}; stop what runs there or pick other ports",
              file=sys.stderr)
        return 2
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        controller = _controller(plan, services)
        print(f"controller   {controller.url}", flush=True)
        print("model worker loading the model...", flush=True)
        worker = _worker(plan, controller.url, services)
        print(f"model worker {worker.url}", flush=True)
        if plan.openai_api:
            api = _openai(plan, controller.url, services)
            note = "" if plan.openai_api == "bayling" else \
                "  (FastChat 0.2.36: streaming fails under pydantic 2; --openai-api bayling streams)"
            print(f"OpenAI API   {api.url}/v1{note}", flush=True)
        web = _web(plan, controller.url, services) if plan.web else None
        if web is not None:
            print(f"web page     {web.url}", flush=True)
        print(f"logs in {plan.log_dir.resolve()}; Ctrl-C stops everything", flush=True)
        budget = RestartBudget(plan.restarts_per_minute)
        while True:
            time.sleep(0.5)
            dead = [s for s in services if not s.alive]
            if not dead:
                continue
            if dead[0] is not worker:
                print(f"error: {dead[0].name} exited with code {dead[0].proc.returncode}; see {dead[0].log_path}",
                      file=sys.stderr)
                return 1
            # The worker died: restart it, keep the controller, the API and the page up.
            delay = budget.next_delay()
            if delay is None:
                print(f"error: the model worker died {plan.restarts_per_minute} times within a minute; "
                      f"see {worker.log_path}", file=sys.stderr)
                return 1
            print(f"model worker exited with code {worker.proc.returncode}; restarting in {delay:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
            services.remove(worker)
            worker = _worker(plan, controller.url, services)
            budget.healthy()
            print(f"model worker {worker.url} (restarted)", flush=True)
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_stack(services)
