"""The streaming engine on a tiny random LLaMA: same tokens as transformers, stops, limits, cancel."""
import threading

import pytest
import torch

from bayling.context import fit_conversation
from bayling.generation import generate, generate_stream
from bayling.tokens import PromptTooLongError, encode_prompt
from bayling.params import GenerationParams
from bayling.templates import Conversation, get_template

PROMPT = "Hello, how are you? 你好"


def reference_greedy(lm, prompt, n):
    ids = torch.tensor([encode_prompt(lm.tokenizer, prompt)])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_generate(tiny_llama):
    params = GenerationParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    chunks = list(generate_stream(tiny_llama.model, tiny_llama.tokenizer, PROMPT, params))
    last = chunks[-1]
    expected = reference_greedy(tiny_llama, PROMPT, 40)
    assert last.completion_tokens == 40 and last.finish_reason == "length"
    full = tiny_llama.tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert last.text == full.rstrip("\ufffd")  # a half character at the cut is not shown
    assert "".join(c.delta for c in chunks) == last.text
    assert last.prompt_tokens == len(encode_prompt(tiny_llama.tokenizer, PROMPT))


def test_sampling_is_reproducible_with_a_seed(tiny_llama):
    params = GenerationParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, max_new_tokens=20,
                              ignore_eos=True, seed=7)
    runs = [generate(tiny_llama.model, tiny_llama.tokenizer, PROMPT, params).text for _ in range(2)]
    assert runs[0] == runs[1]


def test_stop_string_and_echo(tiny_llama):
    base = GenerationParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    full = generate(tiny_llama.model, tiny_llama.tokenizer, PROMPT, base).text
    stop = full[5:8]
    cut = generate(tiny_llama.model, tiny_llama.tokenizer, PROMPT,
                   GenerationParams(temperature=0, max_new_tokens=30, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    echoed = generate(tiny_llama.model, tiny_llama.tokenizer, PROMPT,
                      GenerationParams(temperature=0, max_new_tokens=5, echo=True))
    assert echoed.text.startswith(PROMPT)


def test_cancel_stops_at_next_token(tiny_llama):
    cancel = threading.Event()
    params = GenerationParams(temperature=0, max_new_tokens=100, ignore_eos=True)
    stream = generate_stream(tiny_llama.model, tiny_llama.tokenizer, PROMPT, params, cancel=cancel)
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if chunk.completion_tokens >= 3 and not cancel.is_set():
            cancel.set()
    assert seen[-1].finish_reason == "abort" and seen[-1].completion_tokens <= 4


def test_prompt_too_long_is_refused_before_work(tiny_llama):
    long_prompt = "Hello " * (tiny_llama.context_len + 10)
    with pytest.raises(PromptTooLongError, match="context window is 256 tokens"):
        next(generate_stream(tiny_llama.model, tiny_llama.tokenizer, long_prompt, GenerationParams()))


def test_max_new_tokens_clipped_to_context(tiny_llama):
    prompt_ids = list(range(5, 5 + tiny_llama.context_len - 3))
    last = generate(tiny_llama.model, tiny_llama.tokenizer, prompt_ids,
                    GenerationParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    assert last.completion_tokens == 3 and last.finish_reason == "length"


def test_fit_conversation_keeps_system_and_newest_turns(tiny_llama):
    conv = Conversation(get_template("BayLing"), "SYSTEM PROMPT\n")
    for i in range(30):
        conv.add("user", f"question {i} " + "word " * 10)
        conv.add("assistant", f"answer {i} " + "word " * 10)
    conv.add("user", "the newest question")
    fitted = fit_conversation(conv, tiny_llama.tokenizer, tiny_llama.context_len, 64)
    assert fitted.dropped_messages > 0 and "oldest" in fitted.notice
    assert fitted.prompt.startswith("SYSTEM PROMPT\n") and "the newest question" in fitted.prompt
    assert len(fitted.input_ids) <= tiny_llama.context_len - 64
    assert "question 0 " not in fitted.prompt
    # Whole turns only: the kept history starts with a user message.
    assert fitted.prompt.startswith("SYSTEM PROMPT\n\n### Instruction:\n")


def test_fit_conversation_refuses_a_message_that_cannot_fit(tiny_llama):
    conv = Conversation(get_template("BayLing"))
    conv.add("user", "word " * 1000)
    with pytest.raises(PromptTooLongError, match="shorten the message"):
        fit_conversation(conv, tiny_llama.tokenizer, tiny_llama.context_len, 64)
