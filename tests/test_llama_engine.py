"""The engine on the llama.cpp backend: cancelling a request frees its llama.cpp sequence (the KV cells
themselves, not only the engine's books), so the request waiting for its sequence and the whole KV budget is
admitted next and answers exactly as llama_cpp.Llama does."""
from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from backends import LlamaReference  # noqa: E402
from bayling.demo import demo_gguf_path  # noqa: E402
from bayling.engine.driver import build_engine  # noqa: E402
from bayling.engine.request import OutputKind, Request  # noqa: E402
from bayling.params import GenerationParams  # noqa: E402

PROMPT = "Once upon a time"
KV_TOKENS = 512
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: layers x (K+V) x KV heads x head dim x f16
CHECKED_TOKENS = 8


def held_positions(runner) -> dict[int, int]:
    """llama.cpp's own view: the highest KV position each of its sequences holds (-1 = none)."""
    memory = llama_cpp.llama_get_memory(runner.ctx)
    pos = {slot: int(llama_cpp.llama_memory_seq_pos_max(memory, slot)) for slot in range(runner.options.max_seqs)}
    return {slot: p for slot, p in pos.items() if p >= 0}


def run_steps(engine, n: int) -> list:
    outputs = []
    for _ in range(n):
        outputs += engine.step()
    return outputs


def whole_budget(engine, ids: list[int]) -> GenerationParams:
    """Params whose reservation (prompt + max new tokens) is the engine's entire KV budget."""
    return GenerationParams(temperature=0, max_new_tokens=engine.runner.kv_capacity_tokens() - len(ids),
                            ignore_eos=True)


def test_cancellation_frees_the_sequence(demo_llama):
    tok = demo_llama.tokenizer
    engine = build_engine(demo_llama.model, tok, max_num_seqs=1, kv_cache_memory=KV_TOKENS * KV_BYTES_PER_TOKEN)
    runner = engine.runner
    assert runner.kv_capacity_tokens() == KV_TOKENS
    ids = tok(PROMPT)["input_ids"]
    params = whole_budget(engine, ids)

    engine.add_request(Request("a", ids, params, OutputKind.DELTA))
    run_steps(engine, 4)  # prefill + 3 decodes: the cache holds the prompt and 3 answer tokens
    ((seq, slot),) = runner._slots.items()
    assert held_positions(runner) == {slot: len(ids) + 2}
    # a second request waits: "a" holds the only sequence and every KV token
    engine.add_request(Request("b", ids, params, OutputKind.CUMULATIVE))
    run_steps(engine, 2)
    assert (engine.num_running, engine.num_waiting) == (1, 1) and list(runner._slots) == [seq]

    engine.abort("a")
    outputs = engine.step()  # drops "a" before it admits; "b" then gets the whole budget
    assert [(o.request_id, o.finish_reason) for o in outputs if o.request_id == "a"] == [("a", "abort")]
    assert seq not in runner._slots and (engine.num_running, engine.num_waiting) == (1, 0)
    ((_, b_slot),) = runner._slots.items()
    # llama.cpp holds nothing of "a": only b's prompt, in whichever slot b got (the freed one is reused)
    assert held_positions(runner) == {b_slot: len(ids) - 1}
    assert len(runner._free_slots) == runner.options.max_seqs - 1

    # "b" answers exactly as llama.cpp alone does on a fresh cache: no cell of "a" is in its way
    outputs += run_steps(engine, CHECKED_TOKENS - 1)
    got = [o for o in outputs if o.request_id == "b"][-1]
    reference = LlamaReference(demo_gguf_path(), n_ctx=KV_TOKENS)
    try:
        want = reference.greedy_ids(ids, CHECKED_TOKENS, stop_at_eog=False).token_ids
    finally:
        reference.close()
    assert list(got.token_ids) == want

    engine.abort("b")
    while engine.has_unfinished():
        engine.step()
    assert runner._slots == {} and held_positions(runner) == {}
    assert len(runner._free_slots) == runner.options.max_seqs and engine.kv_tokens_in_use() == 0


def test_cancelled_waiting_request_never_touches_the_cache(demo_llama):
    tok = demo_llama.tokenizer
    engine = build_engine(demo_llama.model, tok, max_num_seqs=1, kv_cache_memory=KV_TOKENS * KV_BYTES_PER_TOKEN)
    ids = tok(PROMPT)["input_ids"]
    params = whole_budget(engine, ids)
    engine.add_request(Request("a", ids, params, OutputKind.DELTA))
    engine.add_request(Request("b", ids, params, OutputKind.DELTA))
    run_steps(engine, 2)
    engine.abort("b")  # still waiting for the budget
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.request_id == "b"] == [("b", "abort")]
    assert len(engine.runner._slots) == 1 and engine.num_waiting == 0
    engine.abort("a")
    while engine.has_unfinished():
        engine.step()
    assert held_positions(engine.runner) == {} and engine.runner._slots == {}
