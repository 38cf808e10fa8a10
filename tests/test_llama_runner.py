"""LlamaCppRunner against llama_cpp.Llama's own evaluation of the demo GGUF (the reference)."""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from bayling.demo import demo_gguf_path  # noqa: E402
from bayling.engine.llama_runner import LlamaCppOptions, LlamaCppRunner, load_llama_model  # noqa: E402
from bayling.engine.runner import Chunk  # noqa: E402

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def reference():
    """llama_cpp.Llama on the same file: its own tokenizer and eval logits."""
    llm = llama_cpp.Llama(str(demo_gguf_path()), n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                          flash_attn=True)  # as the runner computes attention
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def runner():
    r = LlamaCppRunner(demo_gguf_path(), LlamaCppOptions(seq_tokens=256, max_seqs=8, threads=2, batch_tokens=64))
    yield r
    r.close()


def reference_logits(llm, tokens: list[int], then: list[int] = ()) -> np.ndarray:
    """Llama's logits after eval(tokens) (and then eval(then), fed as a second batch)."""
    llm.reset()
    llm.eval(tokens)
    if then:
        llm.eval(list(then))
    return np.array(llm.scores[len(tokens) + len(then) - 1], dtype=np.float32)


def ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def test_prompt_logits_equal_llama_eval(runner, reference):
    tokens = ids(reference, PROMPTS[0])
    got = runner.run([Chunk(1, tokens, 0)])
    assert got.shape == (1, runner.vocab_size) and runner.vocab_size == reference.n_vocab()
    want = reference_logits(reference, tokens)
    np.testing.assert_array_equal(got[0], want)
    runner.free(1)


def greedy(runner, seqs: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    """Greedy decode every sequence together: prefill all in one run, then one token each per run."""
    out = {s: [] for s in seqs}
    logits = runner.run([Chunk(s, t, 0) for s, t in seqs.items()])
    lengths = {s: len(t) for s, t in seqs.items()}
    for _ in range(steps):
        for row, s in enumerate(seqs):
            out[s].append(int(logits[row].argmax()))
        logits = runner.run([Chunk(s, [out[s][-1]], lengths[s] + len(out[s]) - 1) for s in seqs])
    for s in seqs:
        runner.free(s)
    return out


def reference_greedy(llm, tokens: list[int], steps: int) -> list[int]:
    """llama_cpp.Llama's greedy continuation of one sequence, one eval per token."""
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def test_batched_equals_single_and_chunks_split(runner, reference):
    prompts = {10 + i: ids(reference, p) for i, p in enumerate(PROMPTS)}
    together = greedy(runner, prompts, 12)  # batch_tokens=64 < total prompt tokens: the step is split
    for s, tokens in prompts.items():
        assert greedy(runner, {s: tokens}, 12)[s] == together[s]
        assert together[s] == reference_greedy(reference, tokens, 12)


def test_rows_follow_the_callers_order(runner, reference):
    prompts = {1: ids(reference, PROMPTS[0]), 2: ids(reference, PROMPTS[1]), 3: ids(reference, PROMPTS[2])}
    for s, tokens in prompts.items():
        runner.run([Chunk(s, tokens[:-1], 0)])
    runner.free(1)
    runner.run([Chunk(4, prompts[1][:-1], 0)])  # takes the lowest free slot, the one 1 left
    assert sorted(runner._slots.values()) == [0, 1, 2] and runner._slots[4] < runner._slots[2]
    prompts[4] = prompts.pop(1)
    order = [3, 4, 2]  # not the slots' order: llama.cpp is fed in slot order, rows come back in this one
    got = runner.run([Chunk(s, prompts[s][-1:], len(prompts[s]) - 1) for s in order])
    for row, s in enumerate(order):
        np.testing.assert_array_equal(got[row], reference_logits(reference, prompts[s][:-1], prompts[s][-1:]))
    for s in order:
        runner.free(s)


def test_free_and_fork(runner, reference):
    tokens = ids(reference, PROMPTS[1])
    first = runner.run([Chunk(1, tokens, 0)]).copy()  # a view of llama.cpp's buffer until the next run
    runner.fork(1, 2)
    step = runner.run([Chunk(1, [42], len(tokens)), Chunk(2, [42], len(tokens))]).copy()
    # each sequence has a KV stream of its own (the fork's is a copy), so a batch of two gives each
    # row exactly what llama.cpp computes for that one token alone
    want = reference_logits(reference, tokens, [42])
    for row in step:
        np.testing.assert_array_equal(row, want)
    alone = runner.run([Chunk(2, [42], len(tokens))])  # rewinds seq 2 by one token, feeds it alone
    np.testing.assert_array_equal(alone[0], want)
    runner.free(1)
    runner.free(2)
    runner.free(99)  # unknown ids are ignored
    # freed: the ids start afresh at position 0 and give the first prompt's logits again
    np.testing.assert_array_equal(runner.run([Chunk(1, tokens, 0)]), first)
    runner.free(1)


def test_slots_recycle_and_errors(runner):
    for i in range(2 * runner.options.max_seqs):  # more sequences over time than slots
        runner.run([Chunk(1000 + i, [1, 2, 3], 0)])
        runner.free(1000 + i)
    with pytest.raises(ValueError, match="unknown to the runner"):
        runner.run([Chunk(5, [1], 7)])
    held = [Chunk(2000 + i, [1], 0) for i in range(runner.options.max_seqs)]
    runner.run(held)
    with pytest.raises(RuntimeError, match="sequences are in use"):
        runner.run([Chunk(3000, [1], 0)])
    for c in held:
        runner.free(c.seq_id)


def test_each_sequence_has_a_stream_of_its_own():
    small = LlamaCppRunner(demo_gguf_path(), LlamaCppOptions(seq_tokens=256, max_seqs=4, threads=2))
    assert small.kv_capacity_tokens() == 4 * 256
    assert small.context_len == 256  # the stream, not the model's 8192-token window
    # SmolLM2-135M: 30 layers x (K+V) x 3 KV heads x 64 dims x 2 bytes
    assert small.kv_bytes_per_token() == 30 * 2 * 3 * 64 * 2
    # every stream can be full at once
    assert small.run([Chunk(i, [5] * 256, 0) for i in range(4)]).shape == (4, small.vocab_size)
    for i in range(4):
        small.free(i)
    # a sequence cannot spill into the others' cells, however empty they are
    with pytest.raises(RuntimeError, match="no room"):
        small.run([Chunk(1, [5] * 257, 0)])
    # after the failure the stream is empty again: a prompt of nearly all of it fits
    assert small.run([Chunk(1, [5] * 250, 0)]).shape == (1, small.vocab_size)
    with pytest.raises(RuntimeError, match="no room"):
        small.run([Chunk(1, [5] * 7, 250)])
    assert small.run([Chunk(1, [5] * 6, 250)]).shape == (1, small.vocab_size)  # the failed chunk left nothing
    small.close()
    with pytest.raises(ValueError, match="multiple of 256"):
        LlamaCppRunner(demo_gguf_path(), LlamaCppOptions(seq_tokens=300, max_seqs=4))


def test_load_error_is_clear(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match="could not load"):
        load_llama_model(bad)
