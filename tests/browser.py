"""Helpers for the web page's end-to-end tests: start web_server.py, drive it with Debian's headless Chromium."""
import time
from pathlib import Path
from typing import Callable, Optional

from stack import ROOT, Service, free_port, http_json, start_process, wait_http

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# JS: the chat's messages as [role, text] pairs, one per bubble group (an answer and its note share one).
# Gradio draws a placeholder "message bot pending" while an event runs: that is not an answer.
MESSAGES_JS = """panel => [...document.querySelectorAll(
        `#${panel}-chatbot .message.user, #${panel}-chatbot .message.bot:not(.pending)`)]
    .map(e => [e.classList.contains('user') ? 'user' : 'assistant', e.innerText.trim()])"""


def start_web_server(controller_url: str, log_dir: Path, *args: str, timeout: float = 90.0) -> Service:
    """`python web_server.py` on a free port, waiting until its page answers."""
    port = free_port()
    cmd = [str(ROOT / "web_server.py"), "--port", str(port), "--controller-url", controller_url,
           "--log-dir", str(Path(log_dir) / "votes"), *args]
    svc = start_process(f"web-{port}", cmd, log_dir, f"http://127.0.0.1:{port}",
                        env={"GRADIO_ANALYTICS_ENABLED": "False"})
    svc.stop_grace = 2.0
    try:
        wait_http(svc.url + "/", timeout, "GET", svc.proc)
    except Exception as e:
        svc.stop()
        raise RuntimeError(f"web_server.py did not start: {e}\n--- {svc.log_path} ---\n{svc.log()[-3000:]}") from None
    return svc


def launch_chromium(playwright):
    """Debian's Chromium, headless (never Playwright's own browser download)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll check() until it returns something truthy; AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def worker_busy(worker_url: str) -> int:
    """How many requests the worker is decoding or holding in its queue."""
    status = http_json(worker_url + "/worker_get_status")
    batching = status.get("batching", {})
    return int(batching.get("running", 0)) + int(batching.get("waiting", 0)) + int(status.get("queue_length", 0))


class ChatPage:
    """The page in one browser tab, by the elem_ids bayling/serve/web.py gives its components."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url

    def open(self, timeout: float = 30.0) -> "ChatPage":
        self.page.goto(self.url)
        self.page.wait_for_selector("#chat-input textarea", timeout=timeout * 1000)
        return self

    def model(self) -> str:
        return self.page.input_value("#model-picker input")

    def system_prompt(self) -> str:
        return self.page.input_value("#system-prompt textarea")

    def set_number(self, elem_id: str, value: float) -> None:
        box = f"#{elem_id} input[type=number]"
        self.page.fill(box, str(value))
        self.page.press(box, "Enter")

    def messages(self, panel: str = "chat") -> list[tuple[str, str]]:
        return [tuple(m) for m in self.page.evaluate(MESSAGES_JS, panel)]

    def last_text(self, panel: str = "chat") -> str:
        messages = self.messages(panel)
        return messages[-1][1] if messages else ""

    def click(self, elem_id: str) -> None:
        self.page.click(f"#{elem_id}")

    def type_and_send(self, box_id: str, text: str, button_id: Optional[str] = None) -> None:
        self.page.fill(f"#{box_id} textarea", text)
        if button_id:
            self.click(button_id)
        else:
            self.page.press(f"#{box_id} textarea", "Enter")

    def wait_answer_done(self, worker_url: str, panel: str = "chat", timeout: float = 90.0) -> str:
        """Wait for an answer, then until the worker is idle and the chat stopped changing; returns its text."""
        wait_until(lambda: self.messages(panel) and self.messages(panel)[-1][0] == "assistant", timeout,
                   "an answer in the chat")
        wait_until(lambda: worker_busy(worker_url) == 0, timeout, "the worker to finish the answer", 0.3)
        previous = [None]

        def settled():
            now = self.messages(panel)
            same, previous[0] = now == previous[0], now
            return same

        wait_until(settled, 10, "the chat to settle", 0.5)
        return self.last_text(panel)
