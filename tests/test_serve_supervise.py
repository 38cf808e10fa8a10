"""The launcher supervises: a killed worker is restarted while the rest stays up, and every child dies
with the launcher, even when the launcher is killed with SIGKILL (real processes on 127.0.0.1)."""
import os

import psutil
import requests

from bayling.serve.supervise import RestartBudget
from stack import ROOT, free_port, launched

MODEL = "SmolLM2-135M-Instruct"


def test_restart_budget_backs_off_and_is_bounded():
    budget = RestartBudget(per_minute=3, first_delay_s=1, max_delay_s=4)
    assert [budget.next_delay(t) for t in (0, 1, 2)] == [1, 2, 4]
    assert budget.next_delay(3) is None  # a fourth death within a minute: give up
    budget.healthy()
    assert budget.next_delay(70) == 1  # a minute later, from the first delay again


def test_worker_is_restarted_and_children_die_with_a_killed_launcher(tmp_path):
    ports = [free_port() for _ in range(3)]
    args = ["--controller-port", str(ports[0]), "--worker-port", str(ports[1]), "--openai-api", "bayling",
            "--openai-port", str(ports[2]), "--no-web", "--log-dir", str(tmp_path), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "1"}
    with launched(args, env=env) as stack:
        api = f"http://127.0.0.1:{ports[2]}"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert requests.post(api + "/v1/chat/completions", json=chat, timeout=120).status_code == 200
        old = stack.child("bayling.serve.worker")
        old.kill()
        stack.read_until("(restarted)")
        new = stack.child("bayling.serve.worker")
        assert new.pid != old.pid and stack.proc.poll() is None
        r = requests.post(api + "/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, r.text
        children = stack.children()
        stack.process.kill()  # SIGKILL: no chance to stop anything itself
        stack.proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
