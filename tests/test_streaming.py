"""The per-sequence output pipeline: detokenization, stop strings and placeholders under every split."""
import itertools
import random

import pytest

from bayling.deanon import PLACEHOLDERS, deanonymize
from bayling.detok import IncrementalDecoder
from bayling.output import SequenceOutput
from bayling.params import GenerationParams

EOS = 0


class PieceTokenizer:
    """Each token id stands for a fixed piece of text: lets a test choose every split of a string."""

    def __init__(self):
        self.pieces = ["<eos>"]

    def ids_for(self, parts):
        ids = []
        for part in parts:
            self.pieces.append(part)
            ids.append(len(self.pieces) - 1)
        return ids

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == EOS))


def splits(text, max_cuts=3):
    """Every way to cut text into up to max_cuts + 1 non-empty pieces."""
    n = len(text)
    for k in range(0, max_cuts + 1):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


def run(parts, params, end_with_eos=True):
    tok = PieceTokenizer()
    ids = tok.ids_for(parts) + ([EOS] if end_with_eos else [])
    out = SequenceOutput(tok, params, prompt_tokens=3, max_new_tokens=10_000, stop_token_ids=[EOS])
    shown = []
    for i in ids:
        delta = out.push(i)
        shown.append(out.text)
        assert out.text.endswith(delta)
        if out.finished:
            break
    if not out.finished:
        out.finish("length")
    return out, shown


ANON = "I am [NAME], by [INSTITUTE]\\n[名字]"


def test_placeholders_every_split():
    params = GenerationParams(deanonymize=True)
    expected = deanonymize(ANON)
    assert "[" not in expected and "\\n" not in expected
    for parts in splits(ANON, max_cuts=2):
        out, shown = run(parts, params)
        assert out.text == expected, parts
        assert out.finish_reason == "stop"
        for text in shown:  # never half a placeholder, never text that later changes
            assert expected.startswith(text), (parts, text)


def test_placeholder_values():
    assert deanonymize("[NAME] [INSTITUTE] [CREATE_TIME] [名字] [机构] [开发时间]") == (
        "BayLing NLP group of Institute of Computing Technology, Chinese Academy of Sciences (ICT/CAS) 2023 "
        "百聆 中国科学院计算技术研究所自然语言处理研究组 2023年")
    assert set(PLACEHOLDERS) >= {"[NAME]", "[INSTITUTE]", "[CREATE_TIME]", "[名字]", "[机构]", "[开发时间]"}


def test_eos_after_open_bracket_ends_generation():
    # Upstream kept generating while the text ended in '['; here EOS ends it and the '[' is shown.
    out, _ = run(["Look: ", "["], GenerationParams(deanonymize=True))
    assert out.finish_reason == "stop" and out.text == "Look: [" and out.completion_tokens == 3


def test_no_deanonymisation_unless_asked():
    out, _ = run(["Dear [NAME]"], GenerationParams())
    assert out.text == "Dear [NAME]"


@pytest.mark.parametrize("text,stop,expected", [
    ("Hello ### Instruction: more", ("### Instruction:",), "Hello "),
    ("abc</s>def", ("</s>",), "abc"),
    ("no stop here <", ("</s>",), "no stop here <"),
    ("x STOP1 y STOP2", ("STOP2", "STOP1"), "x "),
])
def test_stop_strings_split_across_tokens(text, stop, expected):
    params = GenerationParams(stop=stop)
    for parts in splits(text, max_cuts=2):
        out, shown = run(parts, params, end_with_eos="STOP" not in text and "</s>def" not in text)
        assert out.text == expected, parts
        for partial in shown:
            assert expected.startswith(partial), (parts, partial)
        if expected != text:
            assert out.finish_reason == "stop"


def test_length_and_echo():
    tok = PieceTokenizer()
    ids = tok.ids_for(["a", "b", "c"])
    out = SequenceOutput(tok, GenerationParams(echo=True), 2, max_new_tokens=2, stop_token_ids=[EOS],
                         prompt_text="Q: ")
    for i in ids:
        out.push(i)
        if out.finished:
            break
    assert out.text == "Q: ab" and out.finish_reason == "length" and out.completion_tokens == 2


TEXTS = ["Hello, world! 你好，世界。😀🚀 café", "机器翻译是自然语言处理的重要任务。👍🏽❤️",
         "def add(a, b):\n    return a + b  # 加法"]


@pytest.mark.parametrize("which", ["bpe_tokenizer", "spm_tokenizer"])
def test_incremental_decode_equals_full_decode(which, request):
    tok = request.getfixturevalue(which)
    rng = random.Random(0)
    specials = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in specials]
    sequences = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    sequences += [[rng.choice(vocab) for _ in range(rng.randint(1, 60))] for _ in range(200)]
    for ids in sequences:
        full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        dec = IncrementalDecoder(tok)
        pieces = [dec.push(i) for i in ids]
        pieces.append(dec.flush())
        assert "".join(pieces) == full == dec.text
        if "\ufffd" not in full:  # a multi-byte character never shows up half-made
            assert all("\ufffd" not in p for p in pieces)


def test_incremental_decode_real_text_roundtrip(bpe_tokenizer, spm_tokenizer):
    for tok in (bpe_tokenizer, spm_tokenizer):
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            dec = IncrementalDecoder(tok)
            for i in ids:
                dec.push(i)
            dec.flush()
            assert dec.text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_half_character_at_the_end_is_dropped(bpe_tokenizer):
    # Byte-level BPE: force the character's bytes into separate tokens, then stop after the first.
    byte_ids = [bpe_tokenizer.convert_tokens_to_ids(c) for c in "å¥½"]
    assert bpe_tokenizer.decode(byte_ids) == "好"
    out = SequenceOutput(bpe_tokenizer, GenerationParams(), 1, max_new_tokens=2, stop_token_ids=[])
    out.push(bpe_tokenizer.convert_tokens_to_ids("A"))
    out.push(byte_ids[0])
    assert out.finish_reason == "length" and out.text == "A"
