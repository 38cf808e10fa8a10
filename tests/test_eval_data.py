"""BayLing-80 data: fetch-data's checksum refusal and offline message, verified loading, resumable files."""
from __future__ import annotations

import json

import pytest

from bayling.eval import data
from bayling.eval.cli import main
from bayling.eval.data import ChecksumError, DataFile, load_manifest, load_questions, sha256_bytes
from bayling.eval.io import ResumableWriter, check_rows_match
from eval_helpers import ROOT, write_jsonl
from stack import free_port

SAMPLE = ROOT / "data" / "samples" / "questions.singleturn.en.jsonl"
UPSTREAM = "https://raw.githubusercontent.com/ictnlp/BayLing/39c6d08dae4431552a7c96ce75e7951503829398/data/BayLing-80/"


def test_manifest_lists_upstreams_four_files():
    files = {f.name: f for f in load_manifest()}
    assert files["BayLing-80.singleturn.en.jsonl"].size == 12884
    assert files["BayLing-80.multiturn.zh.jsonl"].sha256 == \
        "ddece5e24109a6fcf0972e2e350e823de6e727fb3cfb23a675eda5ea4f183dfd"
    assert all(f.url == UPSTREAM + f.name for f in files.values()) and len(files) == 4


def test_fetch_data_refuses_files_whose_checksum_differs(tmp_path, capsys):
    source, dest = tmp_path / "mirror", tmp_path / "dest"
    source.mkdir()
    for f in load_manifest():
        (source / f.name).write_bytes(SAMPLE.read_bytes())  # right names, wrong contents
    assert main(["fetch-data", "--dest", str(dest), "--base-url", f"file://{source}"]) == 1
    err = capsys.readouterr().err
    assert err.count("is not the published") == 4 and "not saved" in err
    assert "sha256 32b519315704d3da88accb0cab4fd44622ff530fe49e450c1553030ce3e0f962" in err
    assert not any(dest.iterdir())  # nothing unverified is kept

    (dest / "BayLing-80.singleturn.en.jsonl").write_bytes(SAMPLE.read_bytes())  # a modified local copy
    assert main(["fetch-data", "--dest", str(dest), "--base-url", f"file://{source}"]) == 1
    assert "refusing it" in capsys.readouterr().err


def test_fetch_data_offline_says_exactly_where_to_place_the_files(tmp_path, capsys):
    dest = tmp_path / "dest"
    assert main(["fetch-data", "--dest", str(dest), "--base-url", f"http://127.0.0.1:{free_port()}/x"]) == 1
    err = capsys.readouterr().err
    for f in load_manifest():
        assert f"place it at {dest / f.name} ({f.size} bytes, sha256 {f.sha256})" in err
        assert f"download {f.url} elsewhere" in err


def test_fetch_data_saves_verified_files_and_skips_them_next_time(tmp_path, capsys, monkeypatch):
    source, dest = tmp_path / "mirror", tmp_path / "dest"
    source.mkdir()
    body = SAMPLE.read_bytes()
    (source / "sample.jsonl").write_bytes(body)
    manifest = [DataFile("sample.jsonl", len(body), sha256_bytes(body), f"file://{source}/sample.jsonl")]
    monkeypatch.setattr(data, "load_manifest", lambda *a: manifest)
    assert main(["fetch-data", "--dest", str(dest)]) == 0
    assert (dest / "sample.jsonl").read_bytes() == body and "fetched" in capsys.readouterr().out
    assert main(["fetch-data", "--dest", str(dest)]) == 0
    assert "ok" in capsys.readouterr().out
    assert [p.name for p in dest.iterdir()] == ["sample.jsonl"]  # no temporary files left


def test_loading_refuses_a_modified_upstream_file_unless_allowed(tmp_path, capsys):
    fake = tmp_path / "BayLing-80.singleturn.en.jsonl"
    fake.write_bytes(SAMPLE.read_bytes())
    with pytest.raises(ChecksumError, match="--allow-modified"):
        load_questions(str(fake))
    assert [r["question_id"] for r in load_questions(str(fake), allow_modified=True)] == [1, 2, 3, 4]
    # The CLI refuses before loading any model.
    assert main(["answer", "--questions", str(fake), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "is not the published BayLing-80.singleturn.en.jsonl" in capsys.readouterr().err
    # Files under other names are the user's own and are not checked.
    assert len(load_questions(str(SAMPLE))) == 4
    with pytest.raises(FileNotFoundError, match="fetch-data"):
        load_questions("multiturn.zh", data_dir=tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": "1", "text": "x"}])
    with pytest.raises(ValueError, match="integer question_id"):
        load_questions(str(bad))


def test_resumable_writer_drops_a_half_written_row(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"question_id": 1}) + "\n" + '{"question_id": 2, "resp', encoding="utf-8")
    writer = ResumableWriter(path)
    assert writer.done == 1
    assert path.read_text() == json.dumps({"question_id": 1}) + "\n"
    with writer:
        writer.write({"question_id": 2})
    assert [json.loads(x)["question_id"] for x in path.read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError, match="another input"):
        check_rows_match(writer.existing(), [{"question_id": 1}, {"question_id": 3}], "question_id", path)

    text = tmp_path / "hyp.txt"
    text.write_text("one\ntw", encoding="utf-8")
    lines = ResumableWriter(text, jsonl=False)
    assert lines.done == 1
    with lines:
        lines.write("two\nlines")
    assert text.read_text() == "one\ntwo lines\n"
