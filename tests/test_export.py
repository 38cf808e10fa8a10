"""HF -> GGUF export on tiny random LLaMAs, checked against transformers: the F16 file gives the same greedy
tokens through llama.cpp, Q8_0 mostly the same, bad inputs are refused in one line and nothing half-written
is ever left."""
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from bayling import export as export_module
from bayling.delta.__main__ import main as delta_main
from bayling.export import main

PROMPTS = ["Hello, how are you? The capital of France", "你好，我是百聆", "def add(a, b):"]
SPM_PROMPTS = ["Hello, how are you? The capital of France", "今天天气很好。我们去公园散步吧", "def add(a, b):"]
NEW_TOKENS = 32


def hf_greedy(folder: Path, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)


def llama_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    got = []
    for _ in range(NEW_TOKENS):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    return got


def export(folder: Path, out: Path, quant: str, *extra: str) -> int:
    return main(["--model-path", str(folder), "--gguf", str(out), "--quant", quant, *extra])


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def f16(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.f16.gguf"
    assert export(tiny_llama_dir, out, "F16") == 0
    return out


@pytest.fixture(scope="module")
def spm_llama_dir(tmp_path_factory, spm_tokenizer):
    """A tiny LLaMA whose folder holds the SentencePiece tokenizer.model, as LLaMA/BayLing folders do."""
    from tiny import build_tiny_llama

    folder = build_tiny_llama(tmp_path_factory.mktemp("spm-llama"), spm_tokenizer, seed=1)
    # conftest's spm_tokenizer trained it in its own folder (tmp_path_factory.mktemp("spm"))
    model_file = next(Path(tmp_path_factory.getbasetemp()).glob("spm[0-9]*/tokenizer.model"))
    shutil.copy(model_file, folder / "tokenizer.model")
    return folder


def test_f16_greedy_equals_transformers(tiny_llama_dir, f16, bpe_tokenizer):
    llm = llama(f16)
    for prompt in PROMPTS:
        ids = bpe_tokenizer(prompt).input_ids
        assert llm.tokenize(prompt.encode(), add_bos=False) == ids  # the gpt2 vocabulary and merges carried over
        assert llama_greedy(llm, ids) == hf_greedy(tiny_llama_dir, ids), prompt


def test_f16_metadata(f16, bpe_tokenizer):
    from gguf import GGUFReader

    reader = GGUFReader(str(f16))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.feed_forward_length"]) == (2, 64, 4, 2, 128)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.bos_token_id"] == bpe_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == bpe_tokenizer.chat_template
    assert len(fields["tokenizer.ggml.tokens"]) == len(bpe_tokenizer)
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.1.attn_q.weight"] == "F16" and names["output_norm.weight"] == "F32"
    assert len(names) == 2 * 9 + 3


def test_sentencepiece_export(spm_llama_dir, tmp_path):
    import sentencepiece as spm

    out = tmp_path / "spm.gguf"
    assert export(spm_llama_dir, out, "F16") == 0
    llm = llama(out)
    sp = spm.SentencePieceProcessor(model_file=str(spm_llama_dir / "tokenizer.model"))
    # The test model was trained with SentencePiece's default NFKC normalisation, which llama.cpp does not
    # apply (LLaMA's own tokenizer normalises nothing): prompts here are left unchanged by NFKC.
    for prompt in SPM_PROMPTS:
        assert unicodedata.normalize("NFKC", prompt) == prompt
        ids = [sp.bos_id()] + sp.encode(prompt)
        assert llm.tokenize(prompt.encode()) == ids, prompt  # scores, byte pieces, BOS and the prefix space
        assert llama_greedy(llm, ids) == hf_greedy(spm_llama_dir, ids), prompt


def test_q8_0_agrees_on_most_tokens(tiny_llama_dir, f16, bpe_tokenizer, tmp_path):
    """Teacher-forced: at each of the 32 steps of transformers' greedy run, llama.cpp's Q8_0 argmax is the same."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tiny.q8_0.gguf"
    assert export(tiny_llama_dir, out, "Q8_0") == 0
    assert out.stat().st_size < 0.7 * f16.stat().st_size
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    llm = llama(out)
    agree = []
    for prompt in PROMPTS:
        ids = bpe_tokenizer(prompt).input_ids
        seq = ids + hf_greedy(tiny_llama_dir, ids)
        llm.reset()
        llm.eval(seq)
        got = np.array(llm.scores[len(ids) - 1:len(seq) - 1]).argmax(-1)
        agree.append(int((got == np.array(seq[len(ids):])).sum()))
    assert min(agree) >= 24, agree  # measured 29, 31, 30 of 32
    del model


def test_bad_inputs_refused(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert export(tmp_path / "nowhere", out, "F16") == 2
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "mistral"
    shutil.copytree(tiny_llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    assert export(other, out, "F16") == 2
    assert "only LLaMA models" in capsys.readouterr().err
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert export(no_tok, out, "F16") == 2
    assert "neither tokenizer.model nor tokenizer.json" in capsys.readouterr().err
    assert files(tmp_path) == ["mistral", "no-tokenizer"]  # nothing written, nothing left
    out.write_bytes(b"keep me")
    assert export(tiny_llama_dir, out, "F16") == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit):
        export(tiny_llama_dir, out, "Q3_K")
    assert export(tiny_llama_dir, out, "F16", "--force") == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failure_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, quant, error):
    calls = []
    real = export_module.to_gguf_array

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:  # mid-file: the header and some tensors are written
            raise error("boom")
        return real(*args)

    monkeypatch.setattr(export_module, "to_gguf_array", failing)
    if error is KeyboardInterrupt:
        assert export(tiny_llama_dir, tmp_path / "x.gguf", quant) == 130
    else:
        with pytest.raises(OSError):
            export(tiny_llama_dir, tmp_path / "x.gguf", quant)
    assert len(calls) == 5
    assert files(tmp_path) == []


def test_quantizer_failure_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: 1)
    assert export(tiny_llama_dir, tmp_path / "x.gguf", "Q4_K_M") == 2
    assert "quantizer failed" in capsys.readouterr().err
    assert files(tmp_path) == []


def test_apply_delta_to_gguf(tiny_llama_dir, tmp_path, bpe_tokenizer):
    """A released diff becomes a CPU-ready GGUF in one command, equal in greedy tokens to the merged folder."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    target.save_pretrained(tmp_path / "target")
    bpe_tokenizer.save_pretrained(tmp_path / "target")
    base, delta, merged = str(tiny_llama_dir), str(tmp_path / "delta"), tmp_path / "merged"
    assert delta_main(["--make-diff", "--base-model-path", base, "--target-model-path", str(tmp_path / "target"),
                       "--delta-path", delta, "--no-progress"]) == 0
    assert delta_main(["--base-model-path", base, "--target-model-path", str(merged), "--delta-path", delta,
                       "--no-progress", "--to-gguf", "F16"]) == 0
    gguf = tmp_path / "merged.gguf"
    ids = bpe_tokenizer(PROMPTS[0]).input_ids
    assert llama_greedy(llama(gguf), ids) == hf_greedy(merged, ids)
    assert delta_main(["--base-model-path", base, "--target-model-path", str(merged), "--delta-path", delta,
                       "--no-progress", "--to-gguf", "F16", "--force"]) == 0  # replaced, not refused
    assert delta_main(["--base-model-path", base, "--target-model-path", str(tmp_path / "m2"), "--delta-path",
                       delta, "--no-progress", "--to-gguf", "F16"]) == 0
    (tmp_path / "m3.gguf").write_bytes(b"x")
    assert delta_main(["--base-model-path", base, "--target-model-path", str(tmp_path / "m3"), "--delta-path",
                       delta, "--no-progress", "--to-gguf", "F16"]) == 2
    assert not (tmp_path / "m3").exists()  # refused before merging


def test_demo_model_round_trip(tmp_path):
    """A trained model with tied embeddings, grouped KV heads and a real chat template: the demo's
    safetensors folder exported to F16 gives transformers' greedy tokens through llama.cpp."""
    from transformers import AutoTokenizer

    from bayling.demo import converted_gguf_folder, demo_gguf_path

    folder = converted_gguf_folder(demo_gguf_path())
    out = tmp_path / "demo.f16.gguf"
    assert export(folder, out, "F16") == 0
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea. 12345"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt).input_ids
    llm = llama(out)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    assert llama_greedy(llm, ids) == hf_greedy(folder, ids)


SPLIT_TEXTS = ["Call 0123456789 or +1 (555) 010-9999 before 12:30.", "I'M SURE you'll LOVE it, won't you?",
               "line one\n\n  indented line\r\n\ttab  two  spaces   three", "你好123世界 😀 café 3.14159",
               "    return a + b\n"]


@pytest.mark.parametrize("split", ["gpt-2", "smollm", "llama-bpe"])
def test_pre_tokenizer_carried_over(split, tmp_path):
    """llama.cpp splits text before BPE as the tokenizer.json does (digits one by one for SmolLM2, in
    threes for Llama 3, contractions in any case, runs of newlines), so it tokenizes as transformers."""
    from gguf import GGUFReader

    from tiny import build_bpe_tokenizer, build_tiny_llama

    tok = build_bpe_tokenizer(split=split)
    folder = build_tiny_llama(tmp_path / "m", tok)
    out = tmp_path / "m.gguf"
    assert export(folder, out, "F16") == 0
    assert GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == split
    llm = llama(out)
    for text in SPLIT_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False).input_ids, text
