"""The worker's wire format and FastChat conv dicts: pure functions, no model, no processes."""
import json

import pytest
from fastchat.constants import ErrorCode

from bayling.output import StreamChunk
from bayling.serve.protocol import (PROBES, RequestError, canonical_prompt, chunk_payload, encode, error_payload,
                                    fastchat_conv, parse_body, prepare_request, render_with_fastchat)
from bayling.templates import BAYLING_SYSTEM, Conversation, Message, get_template
from tiny import build_bpe_tokenizer

BAYLING_GOLDEN = (BAYLING_SYSTEM + "\n" + "### Instruction:\nHello\n### Response:\nHi there</s>\n"
                  "### Instruction:\nHow are you?\n### Response:\n")
TURNS = [Message("user", "Hello"), Message("assistant", "Hi there"), Message("user", "How are you?")]


def stock_chunk(text, prompt_tokens, completion_tokens, finish_reason):
    """What fastchat.serve.model_worker.ModelWorker.generate_stream_gate sends for one step."""
    ret = {"text": text, "error_code": 0}
    ret["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}
    ret["finish_reason"] = finish_reason
    ret["logprobs"] = None
    return json.dumps(ret).encode() + b"\0"


@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_chunk_bytes_match_fastchat_worker(finish):
    chunk = StreamChunk("Héllo \"world\" 你好\n", "", 12, 5, finish)
    assert encode(chunk_payload(chunk)) == stock_chunk("Héllo \"world\" 你好\n", 12, 5, finish)


def test_error_chunk():
    assert encode(error_payload(ErrorCode.CONTEXT_OVERFLOW, "too long")) == \
        b'{"text": "too long", "error_code": 40303}\0'


def test_bayling_conv_renders_our_bayling_prompt_exactly():
    conv, problem = fastchat_conv(get_template("BayLing"), None)
    assert problem == ""
    assert conv["sep_style"] == 5 and conv["system_template"] == "{system_message}\n"
    assert conv["roles"] == ["### Instruction:\n", "### Response:\n"]
    assert conv["sep"] == "\n" and conv["sep2"] == "</s>\n"
    assert render_with_fastchat(conv, None, TURNS) == BAYLING_GOLDEN
    assert render_with_fastchat(conv, None, TURNS) == \
        Conversation(get_template("BayLing"), None, TURNS).prompt_for_reply()
    assert render_with_fastchat(conv, "SYS", TURNS[:1]) == "SYS\n### Instruction:\nHello\n### Response:\n" == \
        Conversation(get_template("BayLing"), "SYS", TURNS[:1]).prompt_for_reply()


def test_bayling3_conv_renders_our_prompt_exactly():
    conv, problem = fastchat_conv(get_template("BayLing-3"), None)
    assert problem == ""
    for system, turns in PROBES + ((None, tuple((m.role, m.content) for m in TURNS)),):
        messages = [Message(r, c) for r, c in turns]
        assert canonical_prompt(get_template("BayLing-3"), render_with_fastchat(conv, system, messages)) == \
            Conversation(get_template("BayLing-3"), system, messages).prompt_for_reply()


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_demo_chatml_template_maps_to_fastchat_chatml(backend):
    from backends import demo

    tokenizer = demo(backend).tokenizer  # transformers' from the converted folder, or llama.cpp's own
    conv, problem = fastchat_conv(get_template("tokenizer"), tokenizer)
    assert problem == "", problem
    assert conv["sep_style"] == 9 and conv["roles"] == ["<|im_start|>user", "<|im_start|>assistant"]
    assert conv["system_message"].startswith("You are a helpful AI assistant named SmolLM")
    ours = Conversation(get_template("tokenizer"), "Be brief.", TURNS).prompt_for_reply(tokenizer)
    assert render_with_fastchat(conv, "Be brief.", TURNS) == ours


def test_template_fastchat_cannot_reproduce_is_reported():
    tokenizer = build_bpe_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    conv, problem = fastchat_conv(get_template("tokenizer"), tokenizer)
    assert conv is None and "no FastChat separator style" in problem


def test_chatml_without_default_system_is_reported(bpe_tokenizer):
    # The test tokenizer's ChatML has no default system block, which FastChat's CHATML style always writes.
    conv, problem = fastchat_conv(get_template("tokenizer"), bpe_tokenizer)
    assert conv is not None and "renders" in problem


@pytest.mark.parametrize("body,code", [
    (b"{not json", ErrorCode.VALIDATION_TYPE_ERROR),
    (b"[1, 2]", ErrorCode.VALIDATION_TYPE_ERROR),
    (b"\xff\xfe", ErrorCode.VALIDATION_TYPE_ERROR),
])
def test_malformed_bodies(body, code):
    with pytest.raises(RequestError) as e:
        parse_body(body)
    assert e.value.code == code


@pytest.mark.parametrize("data,code,words", [
    ({"prompt": "hi", "temperature": -1}, ErrorCode.PARAM_OUT_OF_RANGE, "temperature"),
    ({"prompt": "hi", "max_new_tokens": "many"}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens"),
    ({"prompt": "hi", "stop": [1]}, ErrorCode.PARAM_OUT_OF_RANGE, "stop"),
    ({"prompt": 5}, ErrorCode.VALIDATION_TYPE_ERROR, "prompt"),
    ({}, ErrorCode.VALIDATION_TYPE_ERROR, "prompt"),
    ({"messages": []}, ErrorCode.VALIDATION_TYPE_ERROR, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, ErrorCode.VALIDATION_TYPE_ERROR, "role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     ErrorCode.VALIDATION_TYPE_ERROR, "last message"),
    ({"prompt": "word " * 300}, ErrorCode.CONTEXT_OVERFLOW, "context window"),
])
def test_invalid_requests(bpe_tokenizer, data, code, words):
    with pytest.raises(RequestError) as e:
        prepare_request(data, get_template("tokenizer"), bpe_tokenizer, context_len=256)
    assert e.value.code == code and words in e.value.message


def test_prompt_request_echoes_by_default_like_fastchat(bpe_tokenizer):
    p = prepare_request({"prompt": "Hello", "temperature": 0, "top_k": -1}, get_template("tokenizer"),
                        bpe_tokenizer, 256)
    assert p.params.echo and p.params.top_k == 0 and p.prompt_text == "Hello"
    assert not prepare_request({"prompt": "Hello", "echo": False}, get_template("tokenizer"),
                               bpe_tokenizer, 256).params.echo


def test_messages_request_uses_template_and_fits_context(bpe_tokenizer):
    template = get_template("BayLing")
    long_history = []
    for i in range(20):
        long_history += [{"role": "user", "content": f"question {i} " * 5},
                         {"role": "assistant", "content": f"answer {i} " * 5}]
    data = {"messages": [{"role": "system", "content": "SYS"}] + long_history + [{"role": "user", "content": "last"}],
            "max_new_tokens": 32}
    p = prepare_request(data, template, bpe_tokenizer, context_len=256)
    assert not p.params.echo and p.params.deanonymize and "</s>" in p.params.stop
    assert p.prompt_text.startswith("SYS\n### Instruction:\n") and p.prompt_text.endswith("last\n### Response:\n")
    assert p.extra["dropped_messages"] > 0 and "context window full" in p.extra["notice"]
    assert len(p.input_ids) <= 256 - 32
