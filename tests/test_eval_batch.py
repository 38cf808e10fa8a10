"""Static batching: the same greedy answers as one-at-a-time generation, rows leaving as they finish."""
from __future__ import annotations

import pytest

from bayling.eval.batch import generate_batch, generate_many
from bayling.generation import PromptTooLongError, generate
from bayling.output import FINISH_LENGTH, FINISH_STOP
from bayling.params import GenerationParams
from bayling.templates import Conversation, choose_template, params_for_template

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling slowly in a quiet park near the river.",
    "Name a color.",
    "Explain in two sentences why we need sleep, and give one tip for sleeping better.",
    "What is 2 plus 2?",
]


def chat_prompts(loaded, questions):
    template = choose_template(loaded.name)
    prompts = []
    for q in questions:
        conv = Conversation(template)
        conv.add("user", q)
        prompts.append(conv.prompt_for_reply(loaded.tokenizer))
    return template, prompts


def test_batched_greedy_equals_unbatched_on_demo_model(demo_model):
    template, prompts = chat_prompts(demo_model, QUESTIONS)
    params = params_for_template(GenerationParams(temperature=0, max_new_tokens=20), template, demo_model.tokenizer)
    single = [generate(demo_model.model, demo_model.tokenizer, p, params) for p in prompts]
    finished_order = []
    batched = generate_batch(demo_model.model, demo_model.tokenizer, prompts, params,
                             on_row_done=lambda i, chunk: finished_order.append(i))
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in single]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in single]
    assert sorted(finished_order) == list(range(len(prompts)))
    # Rows left the batch at different steps: short answers finished before the long ones.
    assert {c.finish_reason for c in batched} == {FINISH_STOP, FINISH_LENGTH}


def test_repetition_penalty_and_per_row_params_match_unbatched(tiny_llama):
    tok = tiny_llama.tokenizer
    prompts = ["Hello, how are you?", "The capital of France", "def add(a, b):\n    return a + b\n\n# and"]
    params = [GenerationParams(temperature=0, max_new_tokens=n, repetition_penalty=1.3) for n in (5, 9, 3)]
    single = [generate(tiny_llama.model, tok, p, q) for p, q in zip(prompts, params)]
    batched = generate_batch(tiny_llama.model, tok, prompts, params)
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [5, 9, 3]


def test_stop_string_ends_a_row_early(tiny_llama):
    tok = tiny_llama.tokenizer
    free = generate(tiny_llama.model, tok, "Hello", GenerationParams(temperature=0, max_new_tokens=12))
    assert len(free.text) > 3
    stop = free.text[2:4]
    params = GenerationParams(temperature=0, max_new_tokens=12, stop=(stop,))
    out = generate_batch(tiny_llama.model, tok, ["Hello", "The capital of France"], params)
    assert out[0].finish_reason == FINISH_STOP and stop not in out[0].text
    assert out[0].text == generate(tiny_llama.model, tok, "Hello", params).text


def test_generate_many_keeps_prompt_order_and_reports_global_indices(tiny_llama):
    tok = tiny_llama.tokenizer
    prompts = [f"Hello {i}" for i in range(5)]
    params = GenerationParams(temperature=0, max_new_tokens=4)
    seen = []
    many = generate_many(tiny_llama.model, tok, prompts, params, batch_size=2,
                         on_row_done=lambda i, c: seen.append(i))
    assert [c.text for c in many] == [generate(tiny_llama.model, tok, p, params).text for p in prompts]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_prompt_that_does_not_fit_is_refused_before_any_work(tiny_llama):
    with pytest.raises(PromptTooLongError):
        generate_batch(tiny_llama.model, tiny_llama.tokenizer, ["Hello", [5] * 300],
                       GenerationParams(temperature=0, max_new_tokens=4))
    with pytest.raises(ValueError, match="one per prompt"):
        generate_batch(tiny_llama.model, tiny_llama.tokenizer, ["a", "b"], [GenerationParams()] * 3)
