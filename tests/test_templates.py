import pytest

from bayling.params import GenerationParams
from bayling.templates import (BAYLING_SYSTEM, Conversation, choose_template, get_template,
                               params_for_template)


def two_turns(name, system=None):
    conv = Conversation(get_template(name), system)
    conv.add("user", "Hello")
    conv.add("assistant", "Hi there")
    conv.add("user", "How are you?")
    return conv


def test_bayling_golden_prompt():
    expected = (BAYLING_SYSTEM + "\n" + "### Instruction:\nHello\n### Response:\nHi there</s>\n"
                "### Instruction:\nHow are you?\n### Response:\n")
    assert expected.startswith(
        "I am an intelligent language assistant developed by the NLP Group of ICT/CAS.\n"
        "Below is a dialog consisting of instructions and responses. Write a response that completes the request.\n\n")
    assert two_turns("BayLing").prompt_for_reply() == expected


def test_bayling3_golden_prompt():
    expected = ("<|start_header_id|>system<|end_header_id|>\n\nI am BayLing developed by the NLP Group of ICT/CAS."
                "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert two_turns("BayLing-3").prompt_for_reply() == expected


def test_bayling3_strips_messages_and_custom_system():
    conv = Conversation(get_template("BayLing-3"), "Be brief.")
    conv.add("user", "  padded \n")
    assert conv.prompt_for_reply() == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_custom_system_prompt_bayling():
    assert two_turns("BayLing", "SYS\n").prompt_for_reply().startswith("SYS\n\n### Instruction:\nHello\n")


def test_tokenizer_template(bpe_tokenizer):
    conv = two_turns("tokenizer")
    assert conv.prompt_for_reply(bpe_tokenizer) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
    with_system = two_turns("tokenizer", "Be nice.")
    assert with_system.prompt_for_reply(bpe_tokenizer).startswith("<|im_start|>system\nBe nice.<|im_end|>\n")


@pytest.mark.parametrize("model,expected", [
    ("ICTNLP/bayling-13b-v1.1", "BayLing"),
    ("bayling-7b-diff", "BayLing"),
    ("ICTNLP/BayLing-2-llama-3-8b", "BayLing-3"),
    ("bayling-llama-3-8b", "BayLing-3"),
    ("SmolLM2-135M-Instruct", "tokenizer"),
])
def test_choose_template(model, expected):
    assert choose_template(model).name == expected


def test_explicit_template_wins_and_unknown_fails():
    assert choose_template("bayling-13b", "tokenizer").name == "tokenizer"
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        choose_template("x", "vicuna")


def test_save_load_roundtrip():
    conv = two_turns("BayLing-3", "custom")
    again = Conversation.from_dict(conv.to_dict())
    assert again.prompt_for_reply() == conv.prompt_for_reply()


def test_template_params(bpe_tokenizer):
    params = params_for_template(GenerationParams(stop=("x",)), get_template("BayLing"), bpe_tokenizer)
    assert params.deanonymize and params.stop[0] == "x" and "</s>" in params.stop
    assert not params_for_template(GenerationParams(), get_template("tokenizer"), bpe_tokenizer).deanonymize
