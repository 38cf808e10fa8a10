"""The launcher supervises: a killed worker is restarted while the rest stays up, and every child dies
with the launcher, even when the launcher is killed with SIGKILL (real processes on 127.0.0.1)."""
import os
import signal
import subprocess
import sys
import time

import psutil
import requests

from bayling.serve.supervise import RestartBudget
from stack import ROOT, free_port

MODEL = "SmolLM2-135M-Instruct"


def test_restart_budget_backs_off_and_is_bounded():
    budget = RestartBudget(per_minute=3, first_delay_s=1, max_delay_s=4)
    assert [budget.next_delay(t) for t in (0, 1, 2)] == [1, 2, 4]
    assert budget.next_delay(3) is None  # a fourth death within a minute: give up
    budget.healthy()
    assert budget.next_delay(70) == 1  # a minute later, from the first delay again


def _child(launcher: psutil.Process, module: str) -> psutil.Process:
    for p in launcher.children(recursive=True):
        if module in " ".join(p.cmdline()):
            return p
    raise AssertionError(f"no child runs {module}")


def test_worker_is_restarted_and_children_die_with_a_killed_launcher(tmp_path):
    ports = [free_port() for _ in range(4)]
    cmd = [sys.executable, "-m", "bayling.serve", "--controller-port", str(ports[0]), "--worker-port", str(ports[1]),
           "--openai-api", "bayling", "--openai-port", str(ports[3]), "--no-web", "--log-dir", str(tmp_path),
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    launcher = psutil.Process(proc.pid)
    children = []
    try:
        for line in proc.stdout:
            if "Ctrl-C" in line:
                break
        children = launcher.children(recursive=True)
        api = f"http://127.0.0.1:{ports[3]}"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert requests.post(api + "/v1/chat/completions", json=chat, timeout=120).status_code == 200
        old = _child(launcher, "bayling.serve.worker")
        old.kill()
        for line in proc.stdout:
            if "(restarted)" in line:
                break
        new = _child(launcher, "bayling.serve.worker")
        assert new.pid != old.pid and proc.poll() is None
        r = requests.post(api + "/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, r.text
        children = launcher.children(recursive=True)
        launcher.kill()  # SIGKILL: no chance to stop anything itself
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in children:
            if p.is_running():
                p.kill()
