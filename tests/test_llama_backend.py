"""The engine on the llama.cpp backend, end to end on the demo GGUF, against llama_cpp.Llama's own generation."""
from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from bayling.demo import demo_gguf_path  # noqa: E402
from bayling.engine.driver import build_engine, stream  # noqa: E402
from bayling.engine.request import OutputKind, Request  # noqa: E402
from bayling.generation import generate  # noqa: E402
from bayling.llama_loading import seq_tokens_for  # noqa: E402
from bayling.loading import ModelArgs, load_model  # noqa: E402
from bayling.params import GenerationParams  # noqa: E402
from bayling.tokens import PromptTooLongError  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["Once upon a time", "The three primary colours are", "def fibonacci(n):"]
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelArgs(backend="llama.cpp"))


@pytest.fixture(scope="module")
def reference():
    llm = llama_cpp.Llama(str(demo_gguf_path()), n_ctx=512, n_threads=2, verbose=False, flash_attn=True)
    yield llm
    llm.close()


def reference_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def test_loads_without_conversion(loaded):
    assert loaded.is_demo and loaded.path.endswith(".gguf") and hasattr(loaded.model, "handle")


def test_tokenizer_matches_transformers(loaded, demo_model):
    """Same ids, same text, same pieces and the same rendered chat as the transformers tokenizer."""
    ours, hf = loaded.tokenizer, demo_model.tokenizer
    texts = ["Hello, world!", "  two  spaces\nand a newline", "你好，世界 😀 café",
             "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.eos_token_id == hf.eos_token_id and len(ours) == len(hf)
    want = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want


def test_greedy_equals_llama_generate(loaded, reference):
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    want = reference_greedy(reference, ids, 16)
    params = GenerationParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    engine = build_engine(loaded.model, tok)
    got = [o for o in stream(engine, Request("r", ids, params, OutputKind.FINAL))][-1]
    assert list(got.token_ids) == want
    assert got.text == tok.decode(want, skip_special_tokens=True)


def test_batched_equals_single(loaded):
    tok = loaded.tokenizer
    engine = build_engine(loaded.model, tok, max_num_seqs=8)
    single = {p: generate(loaded.model, tok, p, GREEDY, engine=engine).text for p in PROMPTS}
    for i, p in enumerate(PROMPTS):
        engine.add_request(Request(f"b{i}", tok(p)["input_ids"], GREEDY, OutputKind.FINAL))
    together = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason:
                together[PROMPTS[int(out.request_id[1:])]] = out.text
    # each sequence has a KV stream of its own, so what runs beside it changes nothing
    assert together == single


def test_cancellation_frees_the_sequence(loaded):
    tok = loaded.tokenizer
    engine = build_engine(loaded.model, tok, max_num_seqs=2)
    runner = engine.runner
    params = GenerationParams(temperature=0.0, max_new_tokens=200, ignore_eos=True)
    engine.add_request(Request("c", tok(PROMPTS[0])["input_ids"], params, OutputKind.DELTA))
    for _ in range(3):
        engine.step()
    assert len(runner._slots) == 1
    engine.abort("c")
    while engine.has_unfinished():
        engine.step()
    assert runner._slots == {}
    assert len(runner._free_slots) == runner.options.max_seqs


def test_kv_streams_are_sized_from_the_engine_flags():
    GiB = 2**30
    # --kv-cache-memory is split over the sequences, in whole 256-token streams, none past the model's window
    assert seq_tokens_for(8192, 1000, 4, 4_000_000, 64 * GiB) == 768  # 1000 tokens each -> 768
    assert seq_tokens_for(2048, 1000, 1, 64 * GiB, 64 * GiB) == 2048
    assert seq_tokens_for(2000, 1000, 1, 64 * GiB, 64 * GiB) == 2048  # a stream covering the window
    # none asked: the model's window up to 4096 tokens, within 1/8 of RAM
    assert seq_tokens_for(8192, 1000, 16, None, 64 * GiB) == 4096
    assert seq_tokens_for(2048, 1000, 16, None, 64 * GiB) == 2048
    assert seq_tokens_for(8192, 800_000, 16, None, 64 * GiB) == 512  # a 13B's KV in 8 GiB: 655 -> 512 each
    assert seq_tokens_for(128, 1000, 2, None, 64 * GiB) == 256  # llama.cpp's smallest stream
    with pytest.raises(ValueError, match="too few for --max-num-seqs 4 sequences"):
        seq_tokens_for(8192, 1000, 4, 1_000_000, 64 * GiB)


def test_the_engine_window_is_the_stream(loaded):
    engine = build_engine(loaded.model, loaded.tokenizer, max_num_seqs=2, kv_cache_memory=2 * 512 * 23040)
    assert engine.context_len == 512 and engine.runner.kv_capacity_tokens() == 1024
    ids = loaded.tokenizer("hello")["input_ids"]
    with pytest.raises(PromptTooLongError, match="512"):
        engine.add_request(Request("long", ids * 600, GREEDY, OutputKind.FINAL))
    # an answer stops at the end of its stream instead of failing the step
    params = GenerationParams(temperature=0.0, max_new_tokens=10_000, ignore_eos=True)
    got = [o for o in stream(engine, Request("r", ids, params, OutputKind.FINAL))][-1]
    assert got.finish_reason == "length" and len(ids) + len(got.token_ids) == 512


def test_threads_flag_reaches_llama_cpp():
    one = load_model(ModelArgs(backend="llama.cpp", threads=1))
    runner = build_engine(one.model, one.tokenizer, max_num_seqs=1).runner
    assert (llama_cpp.llama_n_threads(runner.ctx), llama_cpp.llama_n_threads_batch(runner.ctx)) == (1, 1)
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        ModelArgs(threads=0)
