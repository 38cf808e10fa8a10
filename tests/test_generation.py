"""The streaming engine on a tiny random LLaMA, on both backends (torch: the HF folder; llama.cpp: its F16
GGUF export): same tokens as the backend's own generation (transformers, llama_cpp.Llama), stops, limits,
cancel."""
import threading

import pytest
import torch

from backends import BACKENDS, LlamaReference
from bayling.context import fit_conversation
from bayling.generation import generate, generate_stream
from bayling.tokens import PromptTooLongError, encode_prompt
from bayling.params import GenerationParams
from bayling.templates import Conversation, get_template

PROMPT = "Hello, how are you? 你好"


@pytest.fixture(params=BACKENDS)
def lm(request):
    """The tiny LLaMA on one backend."""
    return request.getfixturevalue("tiny_llama" if request.param == "torch" else "tiny_llama_cpp")


def reference_greedy(lm, prompt, n):
    """n greedy tokens by the backend's own generation, from the same prompt ids."""
    ids = encode_prompt(lm.tokenizer, prompt)
    if lm.path.endswith(".gguf"):
        ref = LlamaReference(lm.path, n_ctx=lm.context_len)
        try:
            return ref.greedy_ids(ids, n, stop_at_eog=False).token_ids
        finally:
            ref.close()
    ids = torch.tensor([ids])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_the_backends_own_generation(lm):
    params = GenerationParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    chunks = list(generate_stream(lm.model, lm.tokenizer, PROMPT, params))
    last = chunks[-1]
    expected = reference_greedy(lm, PROMPT, 40)
    assert last.completion_tokens == 40 and last.finish_reason == "length"
    full = lm.tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert last.text == full.rstrip("\ufffd")  # a half character at the cut is not shown
    assert "".join(c.delta for c in chunks) == last.text
    assert last.prompt_tokens == len(encode_prompt(lm.tokenizer, PROMPT))


def test_sampling_is_reproducible_with_a_seed(lm):
    params = GenerationParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, max_new_tokens=20,
                              ignore_eos=True, seed=7)
    runs = [generate(lm.model, lm.tokenizer, PROMPT, params).text for _ in range(2)]
    assert runs[0] == runs[1]


def test_stop_string_and_echo(lm):
    base = GenerationParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    full = generate(lm.model, lm.tokenizer, PROMPT, base).text
    stop = full[5:8]
    cut = generate(lm.model, lm.tokenizer, PROMPT,
                   GenerationParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    echoed = generate(lm.model, lm.tokenizer, PROMPT,
                      GenerationParams(temperature=0, max_new_tokens=5, echo=True))
    assert echoed.text.startswith(PROMPT)


def test_cancel_stops_at_next_token(lm):
    cancel = threading.Event()
    params = GenerationParams(temperature=0, max_new_tokens=100, ignore_eos=True)
    stream = generate_stream(lm.model, lm.tokenizer, PROMPT, params, cancel=cancel)
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if chunk.completion_tokens >= 3 and not cancel.is_set():
            cancel.set()
    assert seen[-1].finish_reason == "abort" and seen[-1].completion_tokens <= 4


def test_prompt_too_long_is_refused_before_work(lm):
    long_prompt = "Hello " * (lm.context_len + 10)
    with pytest.raises(PromptTooLongError, match="context window is 256 tokens"):
        next(generate_stream(lm.model, lm.tokenizer, long_prompt, GenerationParams()))


def test_max_new_tokens_clipped_to_context(lm):
    prompt_ids = list(range(5, 5 + lm.context_len - 3))
    last = generate(lm.model, lm.tokenizer, prompt_ids,
                    GenerationParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    assert last.completion_tokens == 3 and last.finish_reason == "length"


def test_fit_conversation_keeps_system_and_newest_turns(lm):
    conv = Conversation(get_template("BayLing"), "SYSTEM PROMPT\n")
    for i in range(30):
        conv.add("user", f"question {i} " + "word " * 10)
        conv.add("assistant", f"answer {i} " + "word " * 10)
    conv.add("user", "the newest question")
    fitted = fit_conversation(conv, lm.tokenizer, lm.context_len, 64)
    assert fitted.dropped_messages > 0 and "oldest" in fitted.notice
    assert fitted.prompt.startswith("SYSTEM PROMPT\n") and "the newest question" in fitted.prompt
    assert len(fitted.input_ids) <= lm.context_len - 64
    assert "question 0 " not in fitted.prompt
    # Whole turns only: the kept history starts with a user message.
    assert fitted.prompt.startswith("SYSTEM PROMPT\n\n### Instruction:\n")


def test_fit_conversation_refuses_a_message_that_cannot_fit(lm):
    conv = Conversation(get_template("BayLing"))
    conv.add("user", "word " * 1000)
    with pytest.raises(PromptTooLongError, match="shorten the message"):
        fit_conversation(conv, lm.tokenizer, lm.context_len, 64)
