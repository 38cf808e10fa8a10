"""Eval conveniences: fetch-data's file mode, --data-dir for short names, answer --limit."""
from __future__ import annotations

import stat

import pytest

from bayling.eval import cli, data
from bayling.eval.cli import main
from bayling.eval.data import DataFile, sha256_bytes
from eval_helpers import ROOT, read_jsonl, write_jsonl

SAMPLE = ROOT / "data" / "samples" / "questions.singleturn.en.jsonl"


def _mirror(tmp_path, monkeypatch, name="BayLing-80.singleturn.en.jsonl"):
    source = tmp_path / "mirror"
    source.mkdir()
    body = SAMPLE.read_bytes()
    (source / name).write_bytes(body)
    manifest = [DataFile(name, len(body), sha256_bytes(body), f"file://{source}/{name}")]
    monkeypatch.setattr(data, "load_manifest", lambda *a: manifest)
    return body


def test_fetched_files_are_readable_by_others(tmp_path, monkeypatch):
    _mirror(tmp_path, monkeypatch)
    dest = tmp_path / "dest"
    assert main(["fetch-data", "--dest", str(dest)]) == 0
    mode = stat.S_IMODE((dest / "BayLing-80.singleturn.en.jsonl").stat().st_mode)
    assert mode == 0o644


def test_default_data_dir_is_per_user_and_never_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "bayling" / "BayLing-80"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "mine"))
    assert data.default_data_dir() == tmp_path / "mine"
    assert data.resolve_questions("multiturn.zh") == tmp_path / "mine" / "BayLing-80.multiturn.zh.jsonl"
    assert ROOT not in data.default_data_dir().parents


@pytest.mark.parametrize("limit,expected", [(None, None), ("2", 2)])
def test_answer_data_dir_and_limit(limit, expected, tmp_path, monkeypatch):
    """Short names resolve in --data-dir; --limit hands only the first N rows to the model."""
    from bayling.eval import answer

    body = _mirror(tmp_path, monkeypatch)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "BayLing-80.singleturn.en.jsonl").write_bytes(body)
    seen = []
    monkeypatch.setattr(cli, "_engine", lambda ns: "model")
    monkeypatch.setattr(answer, "answer_rows", lambda model, rows, output: seen.extend(rows) or len(rows))
    argv = ["answer", "--questions", "singleturn.en", "--data-dir", str(data_dir), "--output", str(tmp_path / "o")]
    assert main(argv + (["--limit", limit] if limit else [])) == 0
    all_rows = read_jsonl(SAMPLE)
    assert seen == all_rows[:expected or len(all_rows)]


def test_answer_short_name_missing_says_where(tmp_path, monkeypatch, capsys):
    _mirror(tmp_path, monkeypatch)
    assert main(["answer", "--questions", "singleturn.en", "--data-dir", str(tmp_path / "none"),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"fetch-data --dest {tmp_path / 'none'}" in capsys.readouterr().err


def test_answer_limit_must_be_positive(tmp_path, monkeypatch, capsys):
    write_jsonl(tmp_path / "q.jsonl", read_jsonl(SAMPLE))
    assert main(["answer", "--questions", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_japanese_bleu_works_out_of_the_box():
    import sacrebleu

    from bayling.eval.mt_scores import bleu_chrf

    hyps, refs = ["猫がマットの上に座った。", "今日は良い天気です。"], ["猫はマットの上に座った。", "今日はいい天気です。"]
    result = bleu_chrf(hyps, refs, "ja")
    assert "tok:ja-mecab" in result["bleu_signature"]
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="ja-mecab").score)


def test_one_source_for_translation_instructions():
    """The page's Translate tab and the eval's translate build the same instruction from the same names."""
    from bayling.eval.translate import translation_instruction as eval_instruction
    from bayling.serve.web_state import LANGUAGES, translation_instruction as page_instruction
    from bayling.translation import CODES

    for code, name in CODES.items():
        assert page_instruction(" 你好 ", "Chinese", name) == eval_instruction("你好", code, "zh")
        assert page_instruction("Hi", "English", name) == eval_instruction("Hi", code, "en")
    assert LANGUAGES["German"] == "德语" and eval_instruction("你好", "ja", "zh") == "提供这句话的日语翻译：你好"
