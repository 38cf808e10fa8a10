"""What reaches the real BayLing models: legacy SentencePiece ids, stripped history, stops.

References: sentencepiece itself (the ids BayLing v1 saw in training), FastChat's own Conversation
with answers stored stripped (what upstream BayLing rendered), and Llama-3's special-token ids.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from bayling.context import fit_conversation
from bayling.output import SequenceOutput
from bayling.params import GenerationParams
from bayling.serve.protocol import canonical_prompt, fastchat_conv, prepare_request, render_with_fastchat
from bayling.templates import ASSISTANT, USER, Conversation, Message, get_template, params_for_template
from bayling.tokens import encode_prompt, legacy_encoder
from tiny import CORPUS

SPECIAL_STRINGS = {"<unk>": 0, "<s>": 1, "</s>": 2}

CONVERSATIONS = {
    "english": [(USER, "Hello, how are you?"), (ASSISTANT, "I am fine, thank you.\n"),
                (USER, "Translate this sentence into Chinese."), (ASSISTANT, "好的。"), (USER, "The capital of France?")],
    "chinese": [(USER, "你好，我是百聆"), (ASSISTANT, "  今天天气很好，我们去公园散步吧。"), (USER, "机器翻译是什么？")],
    "spaces": [(USER, "   spaced question?   "), (ASSISTANT, "\n  an answer  \n\n"), (USER, " 2023 \n")],
    "literal_eos": [(USER, "What does </s> mean? </s> ok"), (ASSISTANT, "It ends a sequence."),
                    (USER, "And <s> x</s>")],
}


def _llama_tokenizer_config(**extra) -> dict:
    """tokenizer_config.json as transformers 4.28 saved BayLing v1's (no `legacy` key)."""
    def added(t):
        return {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
            "clean_up_tokenization_spaces": False, "eos_token": added("</s>"), "model_max_length": 2048,
            "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": added("<unk>"),
            **extra}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A LLaMA-style SentencePiece model trained with LLaMA's settings, saved as a 4.28-era folder."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("llama-spm")
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(_llama_tokenizer_config()))
    return folder


@pytest.fixture(scope="module")
def sp(llama_folder):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(llama_folder / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_tokenizer(llama_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_folder)


def reference_ids(sp, prompt: str) -> list[int]:
    """The slow tokenizer's ids: BOS, then each segment between special tokens through SentencePiece alone."""
    ids = [1]
    for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, SPECIAL_STRINGS)) + ")", prompt)):
        ids += [SPECIAL_STRINGS[piece]] if i % 2 else sp.encode(piece)
    return ids


def bayling_v1(turns) -> Conversation:
    return Conversation(get_template("BayLing"), None, [Message(r, c) for r, c in turns])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_bayling_v1_prompt_ids_are_sentencepiece_per_segment(name, llama_tokenizer, sp):
    prompt = bayling_v1(CONVERSATIONS[name]).prompt_for_reply()
    want = reference_ids(sp, prompt)
    assert legacy_encoder(llama_tokenizer).route == "sentencepiece"
    assert encode_prompt(llama_tokenizer, prompt) == want
    # transformers 5 alone drops the dummy prefix after every </s>: the case this guards against.
    assert llama_tokenizer(prompt)["input_ids"] != want


def test_answer_eos_is_followed_by_the_dummy_prefix_piece(llama_tokenizer, sp):
    ids = encode_prompt(llama_tokenizer, bayling_v1(CONVERSATIONS["english"]).prompt_for_reply())
    after_eos = ids[ids.index(2) + 1:ids.index(2) + 3]
    assert after_eos == sp.encode("\n")[:2] and sp.id_to_piece(after_eos[0]) == "▁"


def test_a_system_prompt_starting_with_a_space_keeps_its_prefix(llama_tokenizer, sp):
    conv = Conversation(get_template("BayLing"), " You are helpful.", [Message(USER, "hi")])
    prompt = conv.prompt_for_reply()
    assert encode_prompt(llama_tokenizer, prompt) == reference_ids(sp, prompt)


def test_every_prompt_path_uses_the_legacy_ids(llama_tokenizer, sp):
    turns = CONVERSATIONS["literal_eos"]
    conv = bayling_v1(turns)
    want = reference_ids(sp, conv.prompt_for_reply())
    template = get_template("BayLing")
    # chat / api.py / eval: fit_conversation; worker `messages`; worker and FastChat `prompt`.
    assert fit_conversation(conv, llama_tokenizer, 2048, 16).input_ids == want
    messages = [{"role": r, "content": c} for r, c in turns]
    assert prepare_request({"messages": messages}, template, llama_tokenizer, 2048).input_ids == want
    assert prepare_request({"prompt": conv.prompt_for_reply()}, template, llama_tokenizer, 2048).input_ids == want


def test_folder_without_tokenizer_model_encodes_per_segment(llama_folder, llama_tokenizer, sp, tmp_path):
    from transformers import AutoTokenizer

    llama_tokenizer.save_pretrained(tmp_path)  # tokenizer.json
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(_llama_tokenizer_config()))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert legacy_encoder(tok).route == "per-segment"
    for turns in CONVERSATIONS.values():
        prompt = bayling_v1(turns).prompt_for_reply()
        assert encode_prompt(tok, prompt) == reference_ids(sp, prompt)


@pytest.mark.parametrize("config", [{"legacy": False}, None])
def test_non_legacy_llama_tokenizers_keep_transformers_ids(config, llama_folder, tmp_path):
    """`legacy: false` (Llama-2 style), or a folder transformers 5 wrote itself: its own encoding."""
    from transformers import AutoTokenizer

    if config is None:
        AutoTokenizer.from_pretrained(llama_folder).save_pretrained(tmp_path)
    else:
        shutil.copy(llama_folder / "tokenizer.model", tmp_path / "tokenizer.model")
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(_llama_tokenizer_config(**config)))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompt = bayling_v1(CONVERSATIONS["english"]).prompt_for_reply()
    assert legacy_encoder(tok) is None
    assert encode_prompt(tok, prompt) == tok(prompt)["input_ids"]


def test_byte_level_tokenizers_are_untouched(bpe_tokenizer):
    prompt = bayling_v1(CONVERSATIONS["spaces"]).prompt_for_reply()
    assert legacy_encoder(bpe_tokenizer) is None
    assert encode_prompt(bpe_tokenizer, prompt) == bpe_tokenizer(prompt)["input_ids"]


# ---- history: answers stored stripped, empty answers as open turns (FastChat's rendering as reference) ----

def upstream_prompt(template_name: str, system, turns) -> str:
    """What upstream BayLing rendered: FastChat's Conversation with every answer stored `.strip()`-ed."""
    template = get_template(template_name)
    conv, _ = fastchat_conv(template, None)
    stored = [Message(r, c.strip() if r == ASSISTANT else c) for r, c in turns]
    return render_with_fastchat(conv, system, stored)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_bayling_v1_history_matches_upstream(name):
    turns = CONVERSATIONS[name]
    assert bayling_v1(turns).prompt_for_reply() == upstream_prompt("BayLing", None, turns)


def test_empty_previous_answer_is_an_open_turn():
    turns = [(USER, "first"), (ASSISTANT, ""), (USER, "second")]
    v1 = bayling_v1(turns).prompt_for_reply()
    assert "### Response:\n### Instruction:\nsecond" in v1 and v1.count("</s>") == 0
    assert v1 == upstream_prompt("BayLing", None, turns)
    v3 = Conversation(get_template("BayLing-3"), None, [Message(r, c) for r, c in turns]).prompt_for_reply()
    assert "assistant<|end_header_id|>\n\n<|start_header_id|>user" in v3
    assert v3 == upstream_prompt("BayLing-3", None, turns)


@pytest.mark.parametrize("name", ["BayLing", "BayLing-3"])
def test_fastchat_prompts_are_canonicalised_to_ours(name):
    """FastChat's OpenAI server renders text as the client sent it; the worker re-renders it as ours."""
    template = get_template(name)
    conv, problem = fastchat_conv(template, None)
    assert problem == ""
    turns = CONVERSATIONS["spaces"] + [(ASSISTANT, "   "), (USER, "\nlast\n")]
    messages = [Message(r, c) for r, c in turns]
    raw = render_with_fastchat(conv, "SYS", messages)
    ours = Conversation(template, "SYS", messages).prompt_for_reply()
    assert raw != ours  # the drift the start-up probe now catches
    assert canonical_prompt(template, raw) == ours


def test_probe_reports_a_fastchat_drift(monkeypatch):
    """Without the canonical re-rendering the spaced probe fails: the probe can fail."""
    import bayling.serve.protocol as protocol

    monkeypatch.setattr(protocol, "CANONICALIZERS", {})
    _, problem = fastchat_conv(get_template("BayLing-3"), None)
    assert "renders the 'BayLing-3' template differently" in problem


# ---- stops ----------------------------------------------------------------------------------------------

def test_bayling3_stops_at_eot_and_end_of_text_whatever_the_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "#": 1, "</s>": 2, "a": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|end_of_text|>", "<|eot_id|>"]})
    params = params_for_template(GenerationParams(), get_template("BayLing-3"), fast)
    eot, end = fast.convert_tokens_to_ids("<|eot_id|>"), fast.convert_tokens_to_ids("<|end_of_text|>")
    assert set(params.stop_token_ids) == {eot, end}
    assert fast.convert_tokens_to_ids("#") not in params.stop_token_ids  # id 2 of Llama-3 is "#"


@pytest.mark.parametrize("answer,shown", [
    ("Sure.\n### Instruction:\nwhat next", "Sure."),
    ("Sure.\n### Instruction: what next", "Sure."),
    ("Use the ### Instruction: header.", "Use the ### Instruction: header."),
])
def test_bayling_v1_stops_at_a_next_instruction_line(answer, shown, bpe_tokenizer):
    params = params_for_template(GenerationParams(), get_template("BayLing"), bpe_tokenizer)
    out = SequenceOutput(bpe_tokenizer, params, prompt_tokens=1, max_new_tokens=1000, stop_token_ids=[])
    for token_id in bpe_tokenizer(answer, add_special_tokens=False)["input_ids"]:
        out.push(token_id)
    out.finish("length")
    assert out.text == shown


# ---- display: exact decode -------------------------------------------------------------------------------

def test_answers_are_decoded_exactly_without_clean_up(bpe_tokenizer):
    """Upstream's transformers 4.x clean-up turned "Bonjour !" into "Bonjour!"; we show what the model wrote."""
    answer = "Bonjour ! Is x > 0 ? Yes , it is ."
    out = SequenceOutput(bpe_tokenizer, GenerationParams(), prompt_tokens=1, max_new_tokens=1000, stop_token_ids=[])
    for token_id in bpe_tokenizer(answer, add_special_tokens=False)["input_ids"]:
        out.push(token_id)
    out.finish("length")
    assert out.text == answer
    assert bpe_tokenizer.clean_up_tokenization(answer) == "Bonjour! Is x > 0? Yes, it is."  # what it would do
