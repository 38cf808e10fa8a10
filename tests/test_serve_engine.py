"""The continuous-batching engine on a tiny random LLaMA: no HTTP, seconds on a CPU."""
import threading
import time

import pytest
import torch

from bayling.generation import encode_prompt, generate
from bayling.params import GenerationParams
from bayling.serve.engine import Engine

PROMPTS = ["Hello, how are you?", "The capital of France is", "def add(a, b):",
           "Translate this sentence into Chinese. I am fine, thank you."]
GREEDY = GenerationParams(temperature=0, max_new_tokens=24, ignore_eos=True)
WAIT_S = 60


class Collector:
    """A sink that keeps every event and says when the request has ended."""

    def __init__(self) -> None:
        self.chunks, self.error, self.done = [], None, threading.Event()
        self.finished_at = None

    def __call__(self, event) -> None:
        if isinstance(event, BaseException):
            self.error = event
            self.done.set()
            return
        self.chunks.append(event)
        if event.finish_reason is not None:
            self.finished_at = time.monotonic()
            self.done.set()

    def wait(self):
        assert self.done.wait(WAIT_S), "request did not finish"
        assert self.error is None, self.error
        return self.chunks[-1]


@pytest.fixture
def engine(tiny_llama):
    eng = Engine(tiny_llama.model, tiny_llama.tokenizer, context_len=tiny_llama.context_len, max_batch=8,
                 stream_interval=1).start()
    yield eng
    eng.stop()


def submit(engine, tiny_llama, prompt, params=GREEDY):
    sink = Collector()
    handle = engine.submit(encode_prompt(tiny_llama.tokenizer, prompt), params, sink, prompt)
    return sink, handle


def wait_for(predicate, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_batched_greedy_equals_one_at_a_time(engine, tiny_llama):
    expected = [generate(tiny_llama.model, tiny_llama.tokenizer, p, GREEDY).text for p in PROMPTS]
    sinks = []
    for p in PROMPTS:  # staggered: later prompts join a batch that is already decoding
        sinks.append(submit(engine, tiny_llama, p)[0])
        time.sleep(0.01)
    got = [s.wait() for s in sinks]
    assert [c.text for c in got] == expected
    assert all(c.finish_reason == "length" and c.completion_tokens == 24 for c in got)
    assert engine.stats.shared_steps > 0 and engine.stats.peak_batch >= 2


def test_request_joins_running_batch_and_leaves_when_done(engine, tiny_llama):
    long_params = GenerationParams(temperature=0, max_new_tokens=120, ignore_eos=True)
    a, _ = submit(engine, tiny_llama, PROMPTS[0], long_params)
    wait_for(lambda: len(a.chunks) >= 5)  # A is mid-generation
    steps_before = engine.stats.decode_steps
    b, _ = submit(engine, tiny_llama, PROMPTS[1], GenerationParams(temperature=0, max_new_tokens=5,
                                                                   ignore_eos=True))
    b.wait()
    a.wait()
    assert b.finished_at < a.finished_at  # B left the batch while A kept going
    assert engine.stats.decode_steps > steps_before and engine.stats.shared_steps >= 4
    assert a.chunks[-1].text == generate(tiny_llama.model, tiny_llama.tokenizer, PROMPTS[0], long_params).text


def test_each_request_keeps_its_own_params(engine, tiny_llama):
    reference = generate(tiny_llama.model, tiny_llama.tokenizer, PROMPTS[2], GREEDY).text
    stop = reference[8:12]
    assert stop.strip(), reference
    stopped, _ = submit(engine, tiny_llama, PROMPTS[2], GenerationParams(temperature=0, max_new_tokens=24,
                                                                         stop=[stop], ignore_eos=True))
    sampled, _ = submit(engine, tiny_llama, PROMPTS[3], GenerationParams(temperature=1.0, top_k=5, top_p=0.9,
                                                                         repetition_penalty=1.3, max_new_tokens=9,
                                                                         ignore_eos=True))
    short, _ = submit(engine, tiny_llama, PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=3,
                                                                       ignore_eos=True))
    assert stopped.wait().text == reference[:reference.index(stop)]
    assert stopped.chunks[-1].finish_reason == "stop"
    assert sampled.wait().completion_tokens == 9
    assert short.wait().completion_tokens == 3


def test_requests_beyond_capacity_wait_in_the_queue(tiny_llama):
    eng = Engine(tiny_llama.model, tiny_llama.tokenizer, context_len=tiny_llama.context_len, max_batch=2).start()
    try:
        sinks = [submit(eng, tiny_llama, p)[0] for p in PROMPTS + PROMPTS[:1]]
        assert eng.queue_length == 5
        wait_for(lambda: eng.waiting > 0 and eng.running == 2)
        assert [s.wait().completion_tokens for s in sinks] == [24] * 5
        assert eng.stats.peak_batch == 2 and eng.queue_length == 0
    finally:
        eng.stop()


def test_abort_frees_the_slot_at_once(tiny_llama):
    eng = Engine(tiny_llama.model, tiny_llama.tokenizer, context_len=tiny_llama.context_len, max_batch=1).start()
    try:
        forever = GenerationParams(temperature=0, max_new_tokens=200, ignore_eos=True)
        a, handle = submit(eng, tiny_llama, PROMPTS[0], forever)
        b, _ = submit(eng, tiny_llama, PROMPTS[1])
        wait_for(lambda: len(a.chunks) >= 3)
        assert eng.waiting == 1  # B waits for A's slot
        handle.abort()
        assert a.wait().finish_reason == "abort" and a.chunks[-1].completion_tokens < 200
        assert b.wait().completion_tokens == 24
        assert eng.stats.aborted == 1 and eng.running == 0
    finally:
        eng.stop()


def test_a_failing_step_fails_its_requests_not_the_engine(engine, tiny_llama, monkeypatch):
    real_forward = tiny_llama.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_llama.model, "forward", flaky)
    failed, _ = submit(engine, tiny_llama, PROMPTS[0])
    assert failed.done.wait(WAIT_S) and isinstance(failed.error, RuntimeError)
    monkeypatch.setattr(tiny_llama.model, "forward", real_forward)
    ok, _ = submit(engine, tiny_llama, PROMPTS[1])
    assert ok.wait().completion_tokens == 24 and engine.stats.errors == 1


def test_prompt_too_long_is_refused_before_queueing(engine, tiny_llama):
    from bayling.generation import PromptTooLongError

    with pytest.raises(PromptTooLongError, match="context window"):
        engine.submit(list(range(5, 5 + tiny_llama.context_len)), GREEDY, Collector())
    assert engine.queue_length == 0


def test_answer_budget_is_capped_by_the_context_window(engine, tiny_llama):
    ids = encode_prompt(tiny_llama.tokenizer, "word " * 40)
    room = tiny_llama.context_len - len(ids)
    sink = Collector()
    engine.submit(ids, GenerationParams(temperature=0, max_new_tokens=10_000, ignore_eos=True), sink)
    assert sink.wait().completion_tokens == room
    assert torch.is_grad_enabled()  # the engine thread's inference mode does not leak
